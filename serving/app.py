"""Ray Serve entry points for Shipyard's endpoint (the deployment lives in `shipyard.serve.endpoint`).

    serve run serving.app:build_app model=models:/digits@champion tracking_uri=sqlite:////abs/path/mlflow.db
    serve deploy serving/config.yaml        # against a running Ray cluster (RAY_AUTH_MODE=token)

Importing this module asks a Ray that `serve run` starts next for fast ingress (HAProxy straight into the
replicas); a running cluster decides that in its own start commands (see cluster.yaml).
"""

from shipyard import build_app, configure_process
from shipyard.serve.endpoint import Predictor

configure_process()  # this module is `serve run`'s entry point: its process's start-up

__all__ = ["Predictor", "build_app"]
