"""Shipyard's exceptions: small hierarchy, messages that say what, where and how to fix."""


class PlatformError(Exception):
    """Base class of every error Shipyard raises on purpose."""


class ConfigError(PlatformError, ValueError):
    """A config file, key or value is wrong; raised before Ray starts."""


class DataError(PlatformError, ValueError):
    """A data file or column cannot be used for training."""


class TrainingError(PlatformError, RuntimeError):
    """A training run or search ended without a usable result."""


class TrackingError(PlatformError, RuntimeError):
    """The MLflow tracking server or registry cannot be used."""


class ServingError(PlatformError, RuntimeError):
    """The endpoint could not be deployed or did not answer as expected."""
