"""The serve section of the config tree (`serve.*`, also what `build_app` and serving/config.yaml take), and the
base every section shares. shipyard.config assembles the whole tree and loads it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys, mutation and NaN/Infinity are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AutoscalingConfig(Section):
    """Ray Serve's `autoscaling_config`: replicas follow the requests in flight per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class InPlaceConfig(Section):
    """The endpoint's knobs a running replica takes in place (Serve's `user_config`: no restart)."""

    max_batch_size: int = Field(32, ge=1)
    """Most requests `@serve.batch` runs through the model at once; 1 turns batching off."""
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    """How long the first request of a batch waits for others: latency paid at low load for throughput at high."""
    canary_model: str | None = None
    """A challenger, `models:/<name>/<version>` or `models:/<name>@<alias>`, that answers `canary_share` of requests."""
    canary_share: float = Field(0.0, ge=0, le=1)
    refresh_s: float = Field(2.0, ge=0)
    """How often each replica re-reads the aliases it serves; a moved alias is loaded and swapped in place
    (0 turns the watch off: then only a redeploy changes the model)."""

    @model_validator(mode="after")
    def _canary_named(self) -> InPlaceConfig:
        if self.canary_share > 0 and not self.canary_model:
            raise ValueError(
                f"canary_share is {self.canary_share} but no canary_model is set; set "
                "canary_model=models:/<name>/<version>"
            )
        return self


class EndpointConfig(InPlaceConfig):
    """What the Serve app itself takes: `build_app` arguments, `serve run ... key=value`, serving/config.yaml."""

    num_replicas: int = Field(1, ge=1)
    """Fixed replica count; ignored when `autoscaling` is set."""
    autoscaling: AutoscalingConfig | None = None
    cpus_per_replica: float = Field(0.5, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica holds at once; must be >= max_batch_size or batches never fill."""
    max_instances: int = Field(1024, ge=1)
    """Most rows accepted in one request; more get a 413."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Larger request bodies get a 413, counted as they arrive (chunked bodies too)."""
    api_key_env: str | None = None
    """Name of an environment variable holding an API key: requests without `X-API-Key: <key>` get a 401.
    The key itself never goes into a config file or the Serve config (replicas get its SHA-256)."""
    access_log: bool = False
    """Serve's per-request access log line: ~20 % fewer requests/s on a tiny model, 2 cores (BENCHMARKS.md)."""

    @model_validator(mode="after")
    def _batches_can_fill(self) -> EndpointConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                f"({self.max_batch_size}): batches could never fill; raise it"
            )
        return self


class ServeConfig(EndpointConfig):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    fast_ingress: bool = True
    """Serve HTTP through HAProxy straight into the replicas (Ray Serve's RAY_SERVE_ENABLE_HA_PROXY and
    RAY_SERVE_THROUGHPUT_OPTIMIZED) instead of the Python proxy actor: ~7x the requests/s on 2 cores
    (BENCHMARKS.md). Applies to a Ray this pipeline starts; a cluster sets them in its start commands."""
    keep_running: bool = False
    """Leave the endpoint up after the pipeline's check. With a Ray this pipeline started, the driver waits for
    Ctrl-C; attached to a cluster (--address, RAY_ADDRESS, `ray job submit`), the app stays deployed there and
    the driver exits (`serve shutdown` or `serve delete <name>` removes it)."""
