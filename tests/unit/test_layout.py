"""The repository layout promises of the design card."""

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stdlib_platform_is_not_shadowed():
    assert not (ROOT / "platform" / "__init__.py").exists()
    # in a subprocess: pytest has already imported `platform`
    out = subprocess.run(
        [sys.executable, "-c", "import platform, uuid; print(platform.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(out.strip()).parent == Path(sysconfig.get_paths()["stdlib"])


def test_generated_files_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", ".shipyard/", "mlruns/", "ray_results/", "*.db", "*.pt"):
        assert entry in ignored


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_cluster_file_passes_rays_own_preflight():
    import yaml
    from ray.autoscaler.sdk import bootstrap_config

    cfg = bootstrap_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()), no_config_cache=True)
    assert cfg["provider"]["type"] == "local"


def test_serve_config_is_a_valid_serve_schema():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serving" / "config.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
