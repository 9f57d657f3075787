"""Stage 5-6, track and promote: MLflow runs, the model registry, and the promotion gate."""
