"""Stage 3, tune: the hyperparameter search on Ray Tune (space, schedulers, trials, PBT, plots)."""
