"""A real multi-node Ray cluster and a real MLflow server on one machine: the proof that a pipeline runs
unchanged on a cluster (`make cluster-demo`, tests/ray/test_multinode.py).

    with LocalCluster(root, nodes=2) as cluster, MlflowServer(root / "mlflow") as ml:
        rc, log = cluster.submit(["python", "-m", "pipelines.digits", f"tracking.uri={ml.url}"], working_dir=".")

Each node is a `ray start --block` process, started as cluster.yaml starts a node: token authentication on
(a token made for this cluster), the dashboard on 127.0.0.1, Serve's fast ingress. Each node gets its own temp
dir: two nodes sharing one unpack a job's working_dir over each other (seen: the job driver's cwd vanished) and
its own ports where Ray's defaults are fixed. Everything is stopped by pid — the node processes and all their
descendants, SIGTERM then SIGKILL; `ray stop` would kill every Ray on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from harness.processes import MlflowServer, stop_tree
from shipyard.serve.ingress import free_loopback_port as free_port

log = logging.getLogger(__name__)

NODE_START_TIMEOUT_S = 90.0


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    """A head and `nodes - 1` worker nodes on this machine, `cpus_per_node` logical CPUs each."""

    def __init__(
        self, root: Path | None = None, nodes: int = 2, cpus_per_node: int = 2, env: dict[str, str] | None = None
    ):
        # short paths: Ray's unix sockets live under the temp dir and a socket path must stay under 108 bytes
        self.own_root = root is None  # removed at stop
        self.root = Path(root or tempfile.mkdtemp(prefix="sy-cluster-"))
        self.nodes, self.cpus_per_node = nodes, cpus_per_node
        self.token = secrets.token_hex(32)
        self.port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.metrics_export_ports: list[int] = []
        """Each node's Prometheus exporter (Ray serves it on every interface, without a token)."""
        self.env = self._environment(env or {})

    @property
    def address(self) -> str:
        """The GCS address for `--address` / RAY_ADDRESS (the GCS listens on every interface)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Where `ray job submit --address` and `serve deploy -a` go."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        from shipyard.serve.ingress import fast_ingress_env

        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(fast_ingress_env())  # as cluster.yaml's start commands do (free stats/metrics ports here)
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token,  # the nodes, `ray job submit` and drivers
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # jobs' `python`: this venv
                # Ray's autoscaler and dashboard serve Prometheus metrics on fixed ports: two Rays on one machine
                # would collide there
                "AUTOSCALER_METRIC_PORT": str(free_port()),
                "DASHBOARD_METRIC_PORT": str(free_port()),
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        env.update(extra)
        return env

    def start(self) -> LocalCluster:
        t0 = time.perf_counter()
        for i in range(self.nodes):
            self._start_node(i)
            self._wait_for_nodes(i + 1)
        log.info(
            "local Ray cluster: %d nodes x %d CPUs at %s (dashboard %s) in %.1f s",
            self.nodes,
            self.cpus_per_node,
            self.address,
            self.dashboard_url,
            time.perf_counter() - t0,
        )
        return self

    def _start_node(self, i: int) -> None:
        temp_dir = self.root / f"n{i}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        metrics_port = free_port()
        if i < len(self.metrics_export_ports):  # a restarted node
            self.metrics_export_ports[i] = metrics_port
        else:
            self.metrics_export_ports.append(metrics_port)
        cmd = [
            _ray_bin(),
            "start",
            "--block",
            f"--num-cpus={self.cpus_per_node}",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={metrics_port}",
            f"--resources={json.dumps({f'shipyard_node_{i}': 1})}",
        ]
        if i == 0:
            cmd += [
                "--head",
                f"--port={self.port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        out = open(self.root / f"n{i}.log", "a")
        self.logs.append(out)
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)

    def kill_node(self, i: int) -> None:
        """Lose worker node `i` at once, as a crashed machine would: SIGKILL to its `ray start`, raylet and
        workers (by pid, and by its temp dir in their command lines)."""
        if not 0 < i < len(self.procs):
            raise ValueError(f"node {i}: give a worker node, 1..{len(self.procs) - 1} (node 0 is the head)")
        marker = f"{self.root / f'n{i}'}{os.sep}"
        root = psutil.Process(self.procs[i].pid)
        doomed = [root, *root.children(recursive=True)]
        doomed += [p for p in psutil.process_iter(["cmdline"]) if any(marker in c for c in p.info["cmdline"] or ())]
        for p in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(doomed, timeout=10)
        self.procs[i].wait(timeout=10)

    def restart_node(self, i: int) -> None:
        """Bring worker node `i` back (a new Ray node on the same temp dir) and wait until it has joined."""
        before = set(self.node_ids())  # may still list the killed node: the GCS marks it dead only later
        self._start_node(i)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not set(self.node_ids()) - before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {i} did not join again in {NODE_START_TIMEOUT_S:.0f} s; logs in {self.root}")
            time.sleep(0.5)

    def node_ids(self) -> list[str]:
        """Ids of the alive nodes."""
        return [n["node_id"] for n in self._nodes()]

    def node_ip(self) -> str:
        """The address the nodes registered with: `ray start` turns 127.0.0.1 into this machine's address
        (ray._private.services.resolve_ip_for_localhost), so the nodes show the machine's IP."""
        return self._nodes()[0]["node_ip"]

    def _nodes(self) -> list[dict[str, Any]]:
        """The dashboard's state API (with the cluster's token): alive nodes."""
        resp = requests.get(
            f"{self.dashboard_url}/api/v0/nodes",
            params={"limit": 100},
            timeout=10,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        resp.raise_for_status()
        return [n for n in resp.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def _wait_for_nodes(self, n: int) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"ray start of node {i} exited ({p.returncode}): "
                        f"{(self.root / f'n{i}.log').read_text()[-2000:]}"
                    )
            try:
                if len(self.node_ids()) >= n:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{n} Ray nodes not up after {NODE_START_TIMEOUT_S:.0f} s; logs in {self.root}")

    def pids(self) -> set[int]:
        """Every process of the cluster now (node processes, raylets, GCS, agents, workers)."""
        found: set[int] = set()
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                found |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        return found

    def submit(
        self, entrypoint: list[str], working_dir: str | Path = ".", echo: bool = False, timeout_s: float = 900
    ) -> tuple[int, str]:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`, waiting for the job; returns (exit code, its log).
        `echo` prints the job's log as it comes. Past `timeout_s` the job is stopped (`ray job stop`) and the
        exit code is 124."""
        job_id = f"shipyard-{secrets.token_hex(4)}"
        cmd = [
            _ray_bin(),
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--submission-id",
            job_id,
            "--working-dir",
            str(working_dir),
            "--",
            *entrypoint,
        ]
        lines: list[str] = []
        timed_out = threading.Event()
        with subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:

            def stop_job() -> None:
                timed_out.set()
                subprocess.run(
                    [_ray_bin(), "job", "stop", "--address", self.dashboard_url, job_id],
                    env=self.env,
                    capture_output=True,
                    timeout=60,
                )
                p.kill()

            timer = threading.Timer(timeout_s, stop_job)
            timer.start()
            try:
                for line in p.stdout:
                    lines.append(line)
                    if echo:
                        print(line, end="", flush=True)
            finally:
                timer.cancel()
        if timed_out.is_set():
            lines.append(f"harness.localcluster: job {job_id} stopped after {timeout_s:.0f} s\n")
            return 124, "".join(lines)
        return p.returncode, "".join(lines)

    def stop(self, keep_logs: bool = False) -> None:
        """Stop every process of the cluster by pid; remove the temp dir it made unless `keep_logs`."""
        stop_tree([p.pid for p in self.procs], marker=str(self.root))
        for p in self.procs:
            p.wait(timeout=10)
        for f in self.logs:
            f.close()
        self.procs.clear(), self.logs.clear()
        if keep_logs:
            log.warning("the cluster's logs are kept in %s (each node's session_latest/logs)", self.root)
        elif self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop(keep_logs=True)
            raise

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(keep_logs=exc_type is not None)


def worker_nodes(tracking_uri: str, parent_run_id: str) -> list[dict[str, str]]:
    """Where the pipeline's final training ran, one entry per rank (node_id, host, node_ip): the
    `worker_placement.json` artifact of its `train` run (the tag `shipyard.worker_nodes` counts ranks per node)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`shipyard.kind` = 'train'"
    )
    if not runs:
        raise RuntimeError(f"no train run under pipeline run {parent_run_id} at {tracking_uri}")
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(
            Path(client.download_artifacts(runs[0].info.run_id, "worker_placement.json", tmp)).read_text()
        )


REPO = Path(__file__).resolve().parents[1]
"""The checkout `make cluster-demo` submits as the job's working_dir (pipelines/ and the configs in it)."""


def demo(argv: list[str] | None = None) -> int:
    """Two nodes + an MLflow server, the digits pipeline through `ray job submit`, checks, teardown."""
    p = argparse.ArgumentParser(description=demo.__doc__)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more pipeline overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (REPO / "pipelines" / "digits.py").is_file():
        log.error("no pipelines/digits.py under %s: run the demo from a Shipyard checkout (make cluster-demo)", REPO)
        return 2
    root = Path(tempfile.mkdtemp(prefix="sy-demo-"))
    summary_path, serve_port = root / "summary.json", free_port()
    ok = False
    try:
        with LocalCluster(root / "ray", args.nodes, args.cpus_per_node) as cluster, MlflowServer(root / "mlflow") as ml:
            # STRICT_SPREAD: one worker per node or none (SPREAD is only a preference)
            entry = [
                "python",
                "-m",
                "pipelines.digits",
                f"tracking.uri={ml.url}",
                f"storage_path={root / 'results'}",
                f"scaling.num_workers={args.nodes}",
                "scaling.placement_strategy=STRICT_SPREAD",
                f"serve.port={serve_port}",
                *args.overrides,
                "--keep-serving",
                "--summary-json",
                str(summary_path),
            ]
            log.info("ray job submit --address %s --working-dir %s -- %s", cluster.dashboard_url, REPO, " ".join(entry))
            rc, _ = cluster.submit(entry, working_dir=REPO, echo=True)
            if rc != 0:
                log.error("the job failed (exit %d): its log is above", rc)
                return 1
            summary = json.loads(summary_path.read_text())
            placement = worker_nodes(ml.url, summary["parent_run_id"])
            resp = requests.post(f"http://127.0.0.1:{serve_port}/predict", json={"instances": [[0.0] * 64]}, timeout=30)
            nodes = cluster.node_ids()
            print(
                json.dumps(
                    {
                        "nodes": nodes,
                        "train_workers": placement,
                        "model": f"{summary['model_name']} v{summary['model_version']}",
                        summary["test_metric_name"]: summary["test_metric"],
                        "endpoint_after_job": {"status": resp.status_code, "body": resp.json()},
                    },
                    indent=1,
                )
            )
            ok = (
                len(placement) == args.nodes
                and {w["node_id"] for w in placement} == set(nodes)
                and resp.ok
                and resp.json().get("model_version") == str(summary["model_version"])
            )
            if not ok:
                log.error(
                    "expected one training worker on each of the %d nodes and the endpoint answering with v%s",
                    args.nodes,
                    summary["model_version"],
                )
            return 0 if ok else 1
    finally:
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            log.warning("kept %s: the nodes' logs (ray/n*/session_latest/logs), the MLflow server's", root)


if __name__ == "__main__":
    sys.exit(demo())
