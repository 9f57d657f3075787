"""The load side of bench/serve.py and bench/soak.py: wrk runs and their parsing, HTTP helpers, server processes
and the machine line every benchmark prints."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


CONCURRENCY = (1, 8, 32)


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    wrk_cores: float  # wrk's CPU time / wall time: how much of the 2 cores the load generator took

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * _UNITS_MS[unit]


def parse_wrk(out: str, wrk_cores: float) -> WrkResult:
    def grab(pattern: str, default: str | None = None) -> str:
        m = re.search(pattern, out, re.M)
        if m is None:
            if default is None:
                raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
            return default
        return m.group(1)

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=float(grab(r"^Requests/sec:\s+([\d.]+)")),
        p50_ms=_ms(grab(r"^\s+50%\s+(\S+)")),
        p99_ms=_ms(grab(r"^\s+99%\s+(\S+)")),
        requests=int(grab(r"^\s+(\d+) requests in")),
        non_2xx=int(grab(r"Non-2xx or 3xx responses: (\d+)", "0")),
        socket_errors=sum(map(int, sock.groups())) if sock else 0,
        wrk_cores=wrk_cores,
    )


def lua_script(path: Path, body: str, delay_ms: float | None = None) -> Path:
    """A wrk script POSTing `body`; with `delay_ms`, each connection waits a random time with that mean before
    each request (exponential: Poisson arrivals per connection, so the connections do not fire in lockstep;
    dithered to the whole ms that wrk takes)."""
    assert "]==]" not in body
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"', f"wrk.body = [==[{body}]==]"]
    if delay_ms is not None:
        wait = f"-{delay_ms:.4f} * math.log(1 - math.random())"
        lines += ["function delay()", f"  return math.floor({wait} + math.random())", "end"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(proc.stdout, cpu / wall)


def measure(label: str, url: str, script: Path, seconds: float, warmup_s: float) -> dict[int, WrkResult]:
    run_wrk(url, script, 8, warmup_s)
    results = {}
    for c in CONCURRENCY:
        r = results[c] = run_wrk(url, script, c, seconds)
        flag = f"  <-- {r.non_2xx} non-2xx, {r.socket_errors} socket errors" if r.errors else ""
        print(
            f"  {label:<20} c={c:<3} {r.rps:9.1f} req/s  p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms  "
            f"wrk {r.wrk_cores:.2f} cores{flag}",
            flush=True,
        )
    return results


def post_json(url: str, payload: dict, timeout: float = 10.0) -> tuple[int, Any]:
    import requests

    r = requests.post(url, json=payload, timeout=timeout)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def wait_for_prediction(
    url: str,
    payload: dict,
    label_of: Callable[[Any], int],
    expected: int,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll until the server answers 200 with a prediction; then check it is the label the model gives."""
    import requests

    deadline, last = time.time() + timeout_s, "no answer"
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        if log_path is not None and log_path.exists() and "Traceback" in log_path.read_text():
            break  # uvicorn restarts a worker that failed to import the app: no use waiting
        try:
            status, answer = post_json(url, payload)
            if status == 200:
                got = label_of(answer)
                if got != expected:
                    raise RuntimeError(f"{url} predicted {got}, the model itself {expected}: {answer}")
                return
            last = f"{status} {answer}"
        except requests.RequestException as err:
            last = repr(err)
        time.sleep(0.5)
    tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
    raise RuntimeError(f"{url} gave no prediction within {timeout_s:.0f} s (last: {last})\n{tail}")


@contextlib.contextmanager
def server_process(cmd: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A server in its own process group, stopped with all its workers when the block ends (errors too)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
                os.killpg(proc.pid, signal.SIGKILL)


def machine() -> str:
    """One line: CPU, count, load average now, and the versions that matter."""
    import mlflow
    import ray
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs, load average {load} at start; Python "
        f"{platform.python_version()}, ray {ray.__version__}, mlflow {mlflow.__version__}, torch "
        f"{torch.__version__}, {wrk_version}"
    )
