import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_on_every_command():
    for args in (
        ["-m", "shipyard", "--help"],
        ["-m", "shipyard", "run", "--help"],
        ["-m", "pipelines.digits", "--help"],
        ["-m", "pipelines.tabular", "--help"],
    ):
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


def test_resume_without_an_unfinished_run_fails_before_ray(tmp_path):
    out = run("-m", "pipelines.digits", f"tracking.uri=sqlite:///{tmp_path}/m.db", "--resume")
    assert out.returncode == 2
    assert "--resume: no unfinished pipeline run of pipeline 'digits'" in out.stderr
    assert "starting or attaching to Ray" not in out.stderr


def test_resume_refuses_a_changed_config_naming_the_key_and_the_value_to_pass(tmp_path):
    import mlflow

    from shipyard import load_config
    from shipyard.track import runs as tracking

    cfg = load_config(ROOT / "pipelines/configs/digits.yaml", {"tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    tracking.setup(cfg)
    with mlflow.start_run(
        run_name="digits-20260101-000000",
        tags={"shipyard.kind": "pipeline", "shipyard.pipeline": "digits", "shipyard.stamp": "20260101-000000"},
    ):
        tracking.log_config(cfg)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    run_id = client.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0].info.run_id
    client.set_terminated(run_id, status="FAILED")  # its driver died
    out = run("-m", "pipelines.digits", f"tracking.uri={cfg.tracking_uri}", "--resume", "train.lr=0.01")
    assert out.returncode == 2
    assert "train.lr is 0.01 (was 0.003): pass the same values (train.lr=0.003)" in out.stderr, out.stderr
    out = run("-m", "pipelines.digits", f"tracking.uri={cfg.tracking_uri}", "tune.scheduler=hyperband", "--resume")
    assert out.returncode == 2 and "a HyperBand search cannot be resumed" in out.stderr


def test_wrong_cluster_address_fails_with_what_to_fix(tmp_path):
    """--address and RAY_ADDRESS: nothing listening there is said at once (Ray itself retries ~20 s, then
    blames "a previous Ray instance that has since crashed"), nothing is written to the tracking store."""
    import os

    tracking = f"tracking.uri=sqlite:///{tmp_path}/m.db"
    out = run("-m", "pipelines.digits", "--address", "127.0.0.1:9", tracking)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "nothing answers at Ray address 127.0.0.1:9" in out.stderr and "ray start --head" in out.stderr
    env = {**os.environ, "RAY_ADDRESS": "no-port-here"}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.digits", tracking],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2 and "Ray address 'no-port-here' is not host:port" in out.stderr
    with socket.create_server(("127.0.0.1", 0)) as not_ray:  # answers TCP, speaks no gRPC: e.g. a dashboard port
        port = not_ray.getsockname()[1]
        out = run("-m", "pipelines.digits", "--address", f"127.0.0.1:{port}", tracking)
    assert out.returncode == 2 and "answers, but not as a Ray cluster's GCS" in out.stderr
    assert not (tmp_path / "m.db").exists()
