"""What the data stage hands on: three Ray Datasets and a JSON-able description of them (DataInfo).

Defined here, below the tasks, because both sides use them: the data stage's table reader returns Splits and
a task's `load` returns Splits (shipyard.tasks re-exports both for user tasks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DataInfo:
    """What the data stage found, in JSON-able form: passed to every worker and trial, logged to MLflow, and
    stored with the registered model (the endpoint reads it to parse requests and form answers)."""

    task: str
    """The task's config spelling (`classification`, or `package.module:Class`)."""
    input_shape: list[int]
    """Shape of one raw model input, as the endpoint receives it (a table: [number of columns])."""
    output_width: int
    """Outputs per example of the network (classes, or 1 for one regression target)."""
    target: str
    """The label or target column's name."""
    feature_names: list[str] = field(default_factory=list)
    classes: list[Any] | None = None
    """Class names in output order (classification); None when the task answers numbers."""
    data_hash: str = ""
    rows: dict[str, int] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """The task's statistics fitted on the train split (means, scales, categories)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Splits:
    """The data stage's result: three materialized Ray Datasets with `x` and `y` columns, and their description."""

    train: Any
    val: Any
    test: Any
    info: DataInfo

    # the description's most read fields, by their old names
    @property
    def feature_names(self) -> list[str]:
        return self.info.feature_names

    @property
    def classes(self) -> list[Any] | None:
        return self.info.classes

    @property
    def data_hash(self) -> str:
        return self.info.data_hash

    @property
    def rows(self) -> dict[str, int]:
        return self.info.rows

    @property
    def in_features(self) -> int:
        return math.prod(self.info.input_shape)

    @property
    def num_classes(self) -> int:
        return self.info.output_width
