"""Stage 4, train: data-parallel PyTorch on Ray Train (the loop, the training step, checkpoints and resume,
metrics delivered to MLflow from the workers)."""
