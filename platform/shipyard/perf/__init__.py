"""Paleo-style performance model: predict step time and data-parallel scaling before anything runs.

Pure arithmetic on frozen value objects plus torch's FLOP counter; no Ray, MLflow or pydantic inside, so a
GPU machine with torch alone can run it (bench/gpu_check.sh).
"""
