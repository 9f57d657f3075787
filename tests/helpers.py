"""Shared test helpers (importable as tests.helpers)."""
import socket

TINY = {"train.epochs": 3, "tune.num_samples": 2, "tune.grace_period": 1, "scaling.num_workers": 2}
"""Overrides for a pipeline run of a few seconds per stage on 2 cores."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
