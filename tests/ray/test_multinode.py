"""The pipeline unchanged on a real two-node Ray cluster (two `ray start` nodes on this machine) with a real
MLflow server, submitted with `ray job submit` as a user would; and what listens where while it runs."""

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from mlflow import MlflowClient

from harness.localcluster import LocalCluster, worker_nodes
from tests.helpers import TINY, free_port, listening_sockets, probe_without_token, report

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def cluster(ray_local):  # ray_local: the session's Ray is up too (two Rays on one host, as on a shared box)
    with LocalCluster(nodes=2, cpus_per_node=2) as c:
        yield c
        pids = c.pids()
    assert len(pids) > 10 and not [p for p in pids if psutil.pid_exists(p)], "cluster processes left after stop"


@pytest.fixture(scope="module")
def job(cluster, mlflow_server, hardware_profile, tmp_path_factory):
    """The digits pipeline through `ray job submit --working-dir .`, its endpoint left up on the cluster."""
    out = tmp_path_factory.mktemp("job")
    serve_port = free_port()
    entry = [
        "python",
        "-m",
        "pipelines.digits",
        f"tracking.uri={mlflow_server}",
        f"storage_path={out / 'results'}",
        f"plan.profile={hardware_profile}",
        *(f"{k}={v}" for k, v in TINY.items()),
        "scaling.placement_strategy=STRICT_SPREAD",  # one worker per node, or none
        f"serve.port={serve_port}",
        "--keep-serving",
        "--summary-json",
        str(out / "summary.json"),
    ]
    rc, log = cluster.submit(entry, working_dir=ROOT)
    assert rc == 0, log[-5000:]
    return {"summary": json.loads((out / "summary.json").read_text()), "log": log, "serve_port": serve_port}


def test_pipeline_trains_on_both_nodes_registers_and_serves(cluster, mlflow_server, job):
    summary = job["summary"]
    assert "running on the Ray cluster at" in job["log"] and "2 nodes" in job["log"]
    placement = worker_nodes(mlflow_server, summary["parent_run_id"])
    assert len(placement) == 2
    assert {w["node_id"] for w in placement} == set(cluster.node_ids())  # one training worker on each node
    train_run = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_run(summary["train_run_id"])
    assert json.loads(train_run.data.tags["shipyard.worker_nodes"]) == {n: 1 for n in cluster.node_ids()}
    assert train_run.data.tags["shipyard.num_nodes"] == "2"
    # registered in the shared server's registry, with the lineage of this run
    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version(
        summary["model_name"], summary["model_version"]
    )
    assert version.tags["shipyard.data_hash"] == summary["data_hash"]
    assert summary["endpoint_accuracy"] == pytest.approx(summary["test_accuracy"], abs=0.005)
    # the endpoint outlives the job: it answers the test process, not only the job's driver
    answer = requests.post(
        f"http://127.0.0.1:{job['serve_port']}/predict", json={"instances": [[0.0] * 64]}, timeout=30
    )
    assert answer.status_code == 200 and answer.json()["model_version"] == str(summary["model_version"])


def test_shipyards_ports_on_loopback_and_rays_refuse_clients_without_the_token(cluster, mlflow_server, job):
    sockets = listening_sockets(cluster.pids())
    ours = {job["serve_port"]: "Serve HTTP", cluster.dashboard_port: "dashboard"}
    for port, what in ours.items():
        bound = {ip for _, _, ip, p in sockets if p == port}
        assert bound and bound <= LOOPBACK, f"{what} port {port} listens on {bound}"
    mlflow_port = int(mlflow_server.rsplit(":", 1)[1])
    server = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == mlflow_port and c.pid}
    mlflow_binds = {ip for _, _, ip, _ in listening_sockets(server)}
    assert server and mlflow_binds == {"127.0.0.1"}, mlflow_binds

    node_ip = cluster.node_ip()
    exposed = sorted({(name, port) for _, name, ip, port in sockets if ip not in LOOPBACK})
    assert exposed, "expected Ray's internal ports on all interfaces"
    seen = {}
    for name, port in exposed:
        seen[(name, port)] = probe_without_token(node_ip, port)
    # a worker port caught while its actor starts or exits answers nothing Ray-like for a moment (CI saw Serve's
    # HAProxyManager mid-`ready()` once): probe it again until it answers or stops listening
    for _ in range(10):
        pending = [key for key, verdict in seen.items() if verdict.startswith("unknown")]
        if not pending:
            break
        time.sleep(2)
        still = {(name, port) for _, name, _, port in listening_sockets(cluster.pids())}
        for name, port in pending:
            if not any(p == port for _, p in still):
                del seen[(name, port)]  # closed: nothing listens there any more
            else:
                seen[(name, port)] = probe_without_token(node_ip, port)
    # Ray serves Prometheus metrics without a token, read-only (no setting binds them to loopback): the
    # autoscaler's, the dashboard's and each node agent's exporter, nothing else
    metrics_ports = {
        int(cluster.env["AUTOSCALER_METRIC_PORT"]),
        int(cluster.env["DASHBOARD_METRIC_PORT"]),
        *cluster.metrics_export_ports,
    }
    for (name, port), verdict in seen.items():
        if port in metrics_ports:
            assert verdict == "metrics", (name, port, verdict)
        else:
            assert verdict == "refused", f"{name} port {port} without a token: {verdict} (all: {seen})"
    assert sum(v == "refused" for v in seen.values()) >= 5  # GCS, 2 raylets, 2 object managers at least


def test_attaching_with_the_wrong_token_is_refused_at_once(cluster, monkeypatch):
    from shipyard import PlatformError
    from shipyard.cluster.attach import check_cluster_address, gcs_accepts_token

    assert gcs_accepts_token(cluster.address, token=cluster.token) is True
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    with pytest.raises(PlatformError, match="refused this machine's token"):
        check_cluster_address(cluster.address)


def test_elastic_training_shrinks_when_a_node_dies_and_grows_back_when_it_returns(cluster, mlflow_server, tmp_path):
    """Last in this module: it kills the worker node (and brings it back). The run trains the gated MLP
    (tests/fault_hooks.py), held at the first step of epoch 4 until the group has shrunk and grown back, so every
    resize lands during epoch 4 of 8 however fast the machine trains."""
    import re
    import subprocess
    import sys

    from tests.fault_hooks import Gate

    epochs = 8
    gate = Gate(tmp_path / "gate")
    gate.hold(4)
    # the endpoint the job left up holds CPUs; without it each node fits one worker of 2 CPUs: 2 -> 1 -> 2
    subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "shutdown", "-a", cluster.dashboard_url, "-y"],
        env=cluster.env,
        capture_output=True,
        timeout=120,
    )
    cmd = [
        sys.executable,
        "-m",
        "pipelines.digits",
        "--address",
        cluster.address,
        f"tracking.uri={mlflow_server}",
        f"storage_path={tmp_path / 'results'}",
        "tune.enabled=false",
        "serve.enabled=false",
        "plan.enabled=false",
        f"train.epochs={epochs}",
        "scaling.num_workers=[1,2]",
        "scaling.cpus_per_worker=2",
        "model.name=tests.fault_hooks:gated_mlp",
        f"model.options={gate.options}",
        "scaling.resize_check_s=2",
        "train.max_failures=3",
        "--summary-json",
        str(tmp_path / "summary.json"),
    ]
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def groups() -> list[int]:  # worker counts of each worker group so far
        return [int(n) for n in re.findall(r"training on (\d+) worker\(s\)", "".join(lines))]

    def at_epoch_4(world: int, seen: set[int]) -> dict:  # a group of `world` workers held at epoch 4
        return gate.wait(
            4, lambda: proc.poll() is None, world=world, exclude_pids=seen, timeout_s=180, what=lambda: "".join(lines)
        )

    try:
        first = at_epoch_4(2, set())
        assert groups() == [2], groups()  # one worker on each node
        cluster.kill_node(1)
        shrunk = at_epoch_4(1, {first["pid"]})  # went on with the head's worker, from epoch 3's checkpoint
        assert groups()[-1] == 1, groups()
        cluster.restart_node(1)
        grown = at_epoch_4(2, {first["pid"], shrunk["pid"]})
        assert groups()[-1] == 2, groups()
        landed = sorted({a["epoch"] for a in gate.arrivals()})
        gate.release(4)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    report(
        f"elastic: worker groups {groups()}; node killed during epoch 4/{epochs}, shrank and grew back during "
        f"epoch 4/{epochs} (epochs begun by then: {landed})"
    )
    assert landed == [1, 2, 3, 4] and grown["world"] == 2 and groups()[0] == groups()[-1] == 2 and 1 in groups()
    summary = json.loads((tmp_path / "summary.json").read_text())
    epochs_done = [
        m.value for m in MlflowClient(mlflow_server).get_metric_history(summary["train_run_id"], "epochs_done")
    ]
    assert sorted(set(epochs_done)) == list(range(1, epochs + 1))
    assert summary["test_accuracy"] > 0.9
