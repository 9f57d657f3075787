"""A pipeline kept serving (--keep-serving, on the local Ray it started) stops on SIGTERM as a service manager
stops it: one line saying the endpoint was stopped, no Ray signal dump, exit 0, and no process of its left."""

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.helpers import free_port, ray_worker_pids, report

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def _alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.add(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def test_sigterm_stops_a_kept_endpoint_with_one_line_and_no_process_left(workdir, tmp_path, ray_local):
    # ray_local: the session's Ray stays up beside the pipeline's own, as on a machine shared with other users
    port = free_port()
    args = [
        f"{k}={v}"
        for k, v in {
            **workdir,
            "tune.enabled": False,
            "plan.enabled": False,
            "train.epochs": 2,
            "scaling.num_workers": 1,
            "serve.port": port,
        }.items()
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.digits", *args, "--keep-serving"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while "endpoint stays up at" not in "".join(lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        answer = requests.post(f"http://127.0.0.1:{port}/predict", json={"instances": [[0.0] * 64]}, timeout=30)
        assert answer.status_code == 200
        ours = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        for raylet in [p for p in ours if psutil.Process(p).name() == "raylet"]:
            ours |= set(ray_worker_pids(raylet))
        assert len(ours) > 5, ours  # GCS, raylet, dashboard, workers, the Serve replica and proxy
        before = len(lines)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    after = "".join(lines[before:])
    report(f"after SIGTERM: {after.strip()!r}")
    assert "SIGTERM received" not in after and "Traceback" not in after, after
    assert (
        len(re.findall(r"SIGTERM: stopped the endpoint at http://127\.0\.0\.1:\d+ and the Ray it ran on", after)) == 1
    ), after
    deadline = time.monotonic() + 60  # Ray's processes exit a moment after the driver
    while _alive(ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ours), [psutil.Process(p).cmdline()[:3] for p in _alive(ours)]
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://127.0.0.1:{port}/predict", json={"instances": [[0.0] * 64]}, timeout=5)
