"""Ray Serve entry points for Shipyard's endpoint (the deployment lives in `shipyard.endpoint`).

    serve run serving.app:build_app model=models:/digits@champion tracking_uri=sqlite:////abs/path/mlflow.db
    serve deploy serving/config.yaml        # against a running Ray cluster (RAY_AUTH_MODE=token)
"""
from shipyard.endpoint import Predictor, build_app

__all__ = ["Predictor", "build_app"]
