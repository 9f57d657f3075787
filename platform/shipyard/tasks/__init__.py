"""Tasks: what is trained (shipyard.tasks.base explains the seam; tabular.py holds the built-in table tasks)."""

from shipyard.tasks.base import (
    BUILTIN_TASKS,
    DataInfo,
    RequestError,
    Splits,
    Task,
    TaskModel,
    make_task,
    objective,
    reencode,
    task_class,
    task_of,
)

__all__ = [
    "BUILTIN_TASKS",
    "DataInfo",
    "RequestError",
    "Splits",
    "Task",
    "TaskModel",
    "make_task",
    "objective",
    "reencode",
    "task_class",
    "task_of",
]
