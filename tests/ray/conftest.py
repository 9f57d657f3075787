"""Integration fixtures: one local Ray (num_cpus=2) for the session, stopped by the driver that started it."""

import pytest

from shipyard import configure_process
from tests.helpers import free_port, kill_leftovers, our_raylet_pid, raylet_processes

configure_process(fast_ingress=False)  # the rest of what an entry point sets at start-up (shipyard.startup)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    configure_process()  # Serve through HAProxy, as the pipeline does: read when Ray starts
    # keep the dashboard: Train V2 needs it to free stopped trials (Ray 2.60); loopback only
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port())
    raylet = our_raylet_pid()
    yield ray
    started = raylet_processes(raylet)
    ray.shutdown()  # stops the processes this driver started, not other Ray instances on the host
    # a worker busy at shutdown (seen: a Train controller) can outlive its raylet: stop it by pid
    left = kill_leftovers(raylet, started)
    if left:
        print(f"killed {len(left)} Ray worker(s) that outlived ray.shutdown(): {left}")


@pytest.fixture(scope="session")
def hardware_profile(ray_local, tmp_path_factory):
    """This machine measured once for the session by `shipyard calibrate`'s code (every Ray node, gloo between
    two Ray workers), at a short budget: the profile every pipeline test plans with (plan.profile)."""
    from shipyard.perf.calibration import calibrate

    path = tmp_path_factory.mktemp("hardware") / "hardware.json"
    calibrate(path, threads=1, budget_s=0.03)
    return path


@pytest.fixture
def workdir(tmp_path, hardware_profile):
    """Per-test MLflow sqlite store and Ray storage, the session's hardware profile: nothing leaks into the
    project."""
    return {
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db",
        "storage_path": str(tmp_path / "results"),
        "plan.profile": str(hardware_profile),
    }


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (harness.processes.MlflowServer), stopped by pid: its URL."""
    from harness.processes import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


@pytest.fixture
def serve_port():
    return free_port()
