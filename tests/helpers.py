"""Shared test helpers (importable as tests.helpers)."""

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import requests

from shipyard.serve.ingress import free_loopback_port as free_port  # noqa: F401 (the tests' one way to get a port)

TINY = {"train.epochs": 3, "tune.num_samples": 2, "tune.grace_period": 1, "scaling.num_workers": 2}
"""Overrides for a pipeline run of a few seconds per stage on 2 cores."""


def _proc_children_named(ppid: int, name: str = "") -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(rest[1]) == ppid and name in comm:
                out.append(int(d.name))
    return out


def ray_worker_pids(raylet_pid: int) -> list[int]:
    """Every live process started by the raylet `raylet_pid` (Ray marks them with RAY_RAYLET_PID)."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def our_raylet_pid() -> int | None:
    """The raylet this process started with ray.init() (a child of this process), if any."""
    pids = _proc_children_named(os.getpid(), "raylet")
    return pids[0] if pids else None


def raylet_processes(raylet_pid: int | None) -> set[int]:
    """Call before ray.shutdown(): the raylet's workers and agents (the agents carry no RAY_RAYLET_PID)."""
    if raylet_pid is None:
        return set()
    return set(ray_worker_pids(raylet_pid)) | set(_proc_children_named(raylet_pid))


def _alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
                out.append(pid)
        except (OSError, IndexError):
            continue
    return out


def kill_leftovers(raylet_pid: int | None, known: set[int] = frozenset(), grace_s: float = 5.0) -> list[int]:
    """After ray.shutdown(): SIGKILL what *our* raylet started and outlived it (by pid, never `ray stop`)."""
    if raylet_pid is None:
        return []

    def leftovers() -> list[int]:
        return _alive(set(known) | set(ray_worker_pids(raylet_pid)))

    deadline = time.time() + grace_s
    while time.time() < deadline and leftovers():
        time.sleep(0.25)
    left = leftovers()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def shutdown_serve(timeout_s: float = 30.0) -> None:
    """serve.shutdown(), then wait until this Ray's HAProxy has let go of its stats port.

    The port is fixed for the whole Ray session (RAY_SERVE_HAPROXY_STATS_PORT, read when Ray starts), so the
    next serve.start() on the same Ray (another test module, a pipeline run) crashes its HAProxy with
    "cannot bind socket (Address already in use)" while the old one is still exiting.
    """
    from ray import serve

    serve.shutdown()
    port = os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT")
    if not port:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener blocks it, TIME_WAIT does not
            try:
                s.bind(("127.0.0.1", int(port)))
                return
            except OSError:
                time.sleep(0.2)


def listening_sockets(pids) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every TCP socket the processes listen on."""
    import psutil

    found = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            found += [
                (pid, p.name(), c.laddr.ip, c.laddr.port)
                for c in p.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:
            pass
    return found


# One real method of each gRPC service Ray listens with (GCS, raylet, object manager, dashboard agent, core
# worker, Ray Client, Serve's replica-to-replica server, Serve's gRPC ingress): a server answers UNIMPLEMENTED
# for the services it does not have.
RAY_GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.ReporterService/GetTraceback",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.RayletDriver/ClusterInfo",
    "/ray.serve.ASGIService/HandleRequest",
    "/ray.serve.RayServeAPIService/ListApplications",
)


def probe_without_token(ip: str, port: int) -> str:
    """What a client without the cluster's token gets from ip:port: 'refused' (HTTP 401/403 or gRPC
    UNAUTHENTICATED), 'metrics' (a Prometheus exporter's read-only text), 'open' (anything else answered), or
    'unknown: <gRPC codes>' (no HTTP/1 answer and no Ray gRPC service recognised, e.g. a worker port caught
    while its process starts or exits)."""
    import grpc

    host = f"[{ip}]" if ":" in ip else ip
    try:
        resp = requests.get(f"http://{host}:{port}/", timeout=3)
        if resp.status_code in (401, 403):
            return "refused"
        metrics = requests.get(f"http://{host}:{port}/metrics", timeout=3)
        if metrics.ok and metrics.text.startswith("# HELP"):
            return "metrics"
        return "open"
    except requests.RequestException:
        pass  # not HTTP/1: gRPC speaks HTTP/2 only
    codes = set()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in RAY_GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=3)
                codes.add("OK")
            except grpc.RpcError as err:
                codes.add(err.code().name)
    if "OK" in codes:
        return "open"
    return "refused" if "UNAUTHENTICATED" in codes else f"unknown: {sorted(codes)}"


def report(message: str) -> None:
    """Print a line that the end of the test run repeats (tests/conftest.py): where a fault landed, a figure."""
    print(f"[report] {message}", flush=True)


def hand_made_profile(tmp_path) -> Path:
    """A hardware profile of round numbers (0.1 TFLOP/s, 20 GB/s, 1 ms per op), written to tmp_path/hw.json."""
    from shipyard.perf.devices import Device, Interconnect, Profile

    device = Device("cpu:test", "cpu", {"fp32": 0.1}, 20.0, 1.0, 1.0, 3.0, "hand-made", threads=1)
    path = tmp_path / "hw.json"
    path.write_text(Profile(device, Interconnect("gloo-loopback", 1.0, 100.0, "hand-made", 0.0)).to_json())
    return path
