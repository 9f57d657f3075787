"""Shipyard: from data to a live HTTP endpoint on Ray (Data, Tune, Train, Serve) with MLflow tracking.

The public API, what a user scripts against (everything else is internal and may move):

    import shipyard

    shipyard.configure_process()                       # once, first: what the `shipyard` command sets at start-up
    cfg = shipyard.load_config("pipelines/configs/digits.yaml", ["train.lr=0.01"])
    print(shipyard.format_plan(shipyard.make_plan(cfg), cfg))   # the plan, without starting Ray
    summary = shipyard.run(cfg)                        # data -> plan -> tune -> train -> promote -> serve
    app = shipyard.build_app({"model": "models:/digits@champion"})   # the endpoint, for serve.run

    class MyTask(shipyard.Task): ...                   # a task of your own: task.name=mypkg.tasks:MyTask
"""

from shipyard.errors import ConfigError, DataError, PlatformError, ServingError, TrackingError, TrainingError

__version__ = "0.1.0"

# loaded on first use: `import shipyard` stays light, and shipyard.perf runs where only torch is installed
# (bench/gpu_check.sh on a bare GPU machine)
_LAZY = {
    "Config": "shipyard.config",
    "load_config": "shipyard.config",
    "apply_overrides": "shipyard.config",
    "configure_process": "shipyard.startup",
    "run": "shipyard.pipeline",
    "make_plan": "shipyard.perf.plan",
    "format_plan": "shipyard.perf.report",
    "build_app": "shipyard.serve.endpoint",
    "Task": "shipyard.tasks",
    "TaskModel": "shipyard.tasks",
    "DataInfo": "shipyard.tasks",
    "Splits": "shipyard.tasks",
    "RequestError": "shipyard.tasks",
}

__all__ = [
    *_LAZY,
    "PlatformError",
    "ConfigError",
    "DataError",
    "TrackingError",
    "ServingError",
    "TrainingError",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shipyard' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
