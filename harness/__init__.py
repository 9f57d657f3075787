"""Test and demo helpers: a multi-node Ray cluster and an MLflow server on one machine (not part of the library)."""
