"""Ray for a driver: a local one started here, or a cluster attached to, checked before any work.

    started = init_ray(address, cfg)   # address: --address, else $RAY_ADDRESS, else a local Ray

Attaching fails in seconds with what to fix (nothing at the address, not a GCS, the token refused, a
tracking store the cluster's other hosts cannot reach) instead of after Ray's retries.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from shipyard.config import Config
from shipyard.errors import ConfigError, PlatformError

log = logging.getLogger(__name__)


def init_ray(address: str | None, cfg: Config | None = None) -> bool:
    """Start a local Ray (token auth on, dashboard on loopback) or attach to `address`/RAY_ADDRESS; with `cfg`,
    a cluster of several hosts must have a tracking store they all reach.

    Returns True when this call started Ray, so the caller knows to shut it down.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _token_mode_if_token()
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_cluster_address(address)
        try:
            context = ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as err:
            raise PlatformError(
                f"cannot attach to the Ray cluster at {address}: {err}. Check the address (`ray status` on the "
                "head prints it) and that this machine holds the cluster's token (~/.ray/auth_token or "
                "RAY_AUTH_TOKEN)"
            ) from err
        nodes = [n for n in ray.nodes() if n["Alive"]]
        hosts = {n["NodeManagerAddress"] for n in nodes}
        log.info(
            "running on the Ray cluster at %s: %d nodes on %d hosts, %s; dashboard %s",
            address,
            len(nodes),
            len(hosts),
            _resources(ray.cluster_resources()),
            _dashboard_url(context),
        )
        if len(hosts) > 1 and cfg is not None:
            _check_shared(cfg, len(hosts))
    else:
        # the dashboard must stay on: Train V2 needs the State API to free stopped trials (Ray 2.60)
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
        log.info(
            "running on a local Ray started here: %s; dashboard %s",
            _resources(ray.cluster_resources()),
            _dashboard_url(context),
        )
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per stage is ours to print
    return not address


def check_cluster_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's ~20 s of retries with a misleading "previous instance crashed" message,
    when nothing answers at a cluster address or the cluster refuses this machine's token."""
    if address == "auto" or "://" in address:  # found locally by Ray itself / Ray Client
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise ConfigError(
            f"Ray address '{address}' is not host:port; use e.g. --address 10.0.0.5:6379 (the head's "
            "`ray start --head --port`) or RAY_ADDRESS=auto on a cluster node"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise PlatformError(
            f"nothing answers at Ray address {address} ({err.strerror or err}): start the head with "
            "`ray start --head --port=6379` (or `ray up cluster.yaml`), or fix --address/RAY_ADDRESS"
        ) from None
    accepted = gcs_accepts_token(address, timeout_s)
    if accepted is False:
        raise PlatformError(
            f"the Ray cluster at {address} refused this machine's token: copy the cluster's token "
            "to ~/.ray/auth_token (or set RAY_AUTH_TOKEN) and run with RAY_AUTH_MODE=token"
        )
    if accepted is None:
        raise PlatformError(
            f"{address} answers, but not as a Ray cluster's GCS: use the head's `ray start --port` "
            "(6379 by default), not the dashboard's (8265) or Ray Client's (10001)"
        )


def gcs_accepts_token(address: str, timeout_s: float = 5.0, token: str | None = None) -> bool | None:
    """Ask the cluster's GCS for its node list with the token Ray would send (RAY_AUTH_TOKEN, else the file at
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): True = accepted, False = refused, None = no answer."""
    import grpc

    if token is None and os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        token = os.environ.get("RAY_AUTH_TOKEN")
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
        if not token and path.is_file():
            token = path.read_text().strip()
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")  # raw bytes in, raw bytes out
        try:
            call(b"", timeout=timeout_s, metadata=metadata)
            return True
        except grpc.RpcError as err:
            return False if err.code() == grpc.StatusCode.UNAUTHENTICATED else None


def _check_shared(cfg: Config, hosts: int) -> None:
    """Training workers on other hosts log to tracking.uri and write checkpoints to storage_path: a store
    that lives on this machine fails them mid-run, so say it now."""
    uri = urlparse(cfg.tracking_uri)
    if uri.scheme in ("", "file", "sqlite") or uri.hostname in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            f"tracking.uri {cfg.tracking_uri} is on this machine, but the cluster spans {hosts} hosts "
            'whose training workers log to it: start an MLflow server they reach (README "Scale '
            'out") and set tracking.uri=http://<its address>:5000'
        )
    if "://" not in cfg.storage_path:
        log.warning(
            "storage_path %s is a local path on a cluster of %d hosts: it must be the same shared disk "
            "(NFS) on every node, else use s3://, gs:// or another URI every node reaches",
            cfg.storage_path,
            hosts,
        )


def _resources(res: dict[str, float]) -> str:
    keep = ("CPU", "GPU")
    return ", ".join(f"{res[k]:g} {k}" for k in keep if res.get(k)) or "no CPU or GPU"


def _dashboard_url(context) -> str:
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else (url or "(none)")


def _token_mode_if_token() -> None:
    """A cluster started with `ray start` checks tokens, but a client sends one only in token mode
    (Ray 2.60): switch it on when a token exists and the user has not chosen a mode. Before Ray is imported,
    shipyard.startup.configure_process does so (Ray reads the mode once, at import); once it is imported (a
    notebook, a test), Ray's own helper sets the mode and refreshes the config it read."""
    if "RAY_AUTH_MODE" in os.environ or "ray" not in sys.modules:
        return
    from shipyard.private_apis import enable_token_auth_if_token_available

    enable_token_auth_if_token_available()
