"""Shared test helpers (importable as tests.helpers)."""
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

TINY = {"train.epochs": 3, "tune.num_samples": 2, "tune.grace_period": 1, "scaling.num_workers": 2}
"""Overrides for a pipeline run of a few seconds per stage on 2 cores."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_children_named(ppid: int, name: str = "") -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
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
