"""Shipyard: from data to a live HTTP endpoint on Ray (Data, Tune, Train, Serve) with MLflow tracking."""
from shipyard.config import Config, apply_overrides, load_config
from shipyard.errors import ConfigError, DataError, PlatformError, ServingError, TrackingError, TrainingError

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "apply_overrides", "PlatformError", "ConfigError", "DataError",
           "TrackingError", "ServingError", "TrainingError"]
