import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_on_every_command():
    for args in (["-m", "shipyard", "--help"], ["-m", "shipyard", "run", "--help"],
                 ["-m", "pipelines.digits", "--help"], ["-m", "pipelines.tabular", "--help"]):
        out = run(*args)
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout


def test_unknown_key_fails_before_ray_starts():
    out = run("-m", "pipelines.digits", "train.lerning_rate=0.1")
    assert out.returncode == 2
    assert "did you mean 'train.lr'" in out.stderr
    assert "starting or attaching to Ray" not in out.stderr


def test_missing_data_file_fails_before_ray_starts(tmp_path):
    out = run("-m", "pipelines.tabular", f"data.path={tmp_path / 'none.csv'}", "data.label=y")
    assert out.returncode == 2
    assert "file not found" in out.stderr and "starting or attaching to Ray" not in out.stderr


def test_unreachable_tracking_server_fails_fast():
    out = run("-m", "shipyard", "run", "pipelines/configs/digits.yaml", "tracking.uri=http://127.0.0.1:9")
    assert out.returncode == 2
    assert "tracking.uri http://127.0.0.1:9 does not answer" in out.stderr
