"""Processes the harness starts and stops by pid: a process tree (never `ray stop`, which would stop every Ray on
the machine) and a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from shipyard.serve.ingress import free_loopback_port as free_port


def stop_tree(pids: list[int], marker: str | None = None, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every process in `pids` and all their descendants (and, with `marker`, any process whose command
    line holds it: Ray workers that outlived their raylet); SIGKILL what is left after `grace_s`. The whole set
    is collected before the first signal: a job driver is a grandchild of a Ray worker and is reparented away
    once that worker dies. Returns the pids signalled."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in p.info["cmdline"] or ()):
                procs.setdefault(p.pid, p)
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:  # Ray's head `ray start --block` and its GCS do not always exit on SIGTERM
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return sorted(procs)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite store, artifacts proxied by the server), stopped by pid."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        out = self.log_file = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree([self.proc.pid])  # the server, its uvicorn worker, its job runner and huey consumers
            self.proc.wait(timeout=10)
            self.proc = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
