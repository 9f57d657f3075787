"""Stage 2, plan: a Paleo-style performance model that predicts step time and data-parallel scaling before
anything runs.

The model itself (devices, comm, estimate, layers, search, probes) is pure arithmetic on frozen value objects
plus torch's FLOP counter, with no Ray, MLflow or pydantic inside, so a GPU machine with torch alone can run it
(bench/gpu_check.sh). `plan` joins it to the config and the data; `calibration` measures a cluster's nodes with
Ray tasks.
"""
