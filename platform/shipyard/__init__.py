"""Shipyard: from data to a live HTTP endpoint on Ray (Data, Tune, Train, Serve) with MLflow tracking."""

from shipyard.errors import ConfigError, DataError, PlatformError, ServingError, TrackingError, TrainingError

__version__ = "0.1.0"
__all__ = [
    "Config",
    "load_config",
    "apply_overrides",
    "PlatformError",
    "ConfigError",
    "DataError",
    "TrackingError",
    "ServingError",
    "TrainingError",
]


def __getattr__(name: str):
    # the config tree (pydantic, PyYAML) loads on first use: shipyard.perf runs where only torch is installed
    # (bench/gpu_check.sh on a bare GPU machine)
    if name in ("Config", "load_config", "apply_overrides"):
        from shipyard import config

        return getattr(config, name)
    raise AttributeError(f"module 'shipyard' has no attribute '{name}'")
