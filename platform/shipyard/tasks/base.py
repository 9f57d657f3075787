"""The task seam: what differs between workloads, in one class a user can subclass.

    task = make_task(cfg.task)             # classification, regression, or `mypkg.tasks:MyTask`
    splits = task.load(cfg.data)           # Ray Datasets + DataInfo (shapes, classes, fitted preprocessing)
    model = task.build_model(cfg.model)    # the user's network wrapped in the task's encoder and decoder

A task owns reading the source (`load`), preprocessing fitted on the train split (`encoder`/`decoder`, baked
into the model, so the exported model takes raw inputs and gives answers in real units), the loss of a batch
(`loss`), its evaluation metrics (`metrics`) with the primary one and its direction (`METRICS`, first entry),
and the endpoint's side: turning request instances into a model input (`parse_instances`) and outputs into
answers (`answers`). Shipyard owns everything around it: distribution, search, tracking, registry, serving,
the plan. The idea is Determined's Trial and Lightning's LightningModule: the user writes the workload, the
platform runs it.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from shipyard.data.splits import DataInfo, Splits
from shipyard.errors import ConfigError

if TYPE_CHECKING:
    from shipyard.config import DataConfig, ModelConfig, TaskConfig


class RequestError(ValueError):
    """A request instance the task cannot take: the endpoint answers 422 with this message."""


class TaskModel(nn.Module):
    """encoder -> the configured network -> decoder: preprocessing and output scaling travel with the weights,
    through checkpoints and torch.export, so the registered model takes raw inputs and answers in real units."""

    def __init__(self, encoder: nn.Module, net: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.net, self.decoder = encoder, net, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.net(self.encoder(x)))


class Task:
    """The base of every task. Subclasses set METRICS and implement `load`, `loss` and `metrics`; the rest
    has defaults that fit a network mapping a float tensor batch to `output_width` outputs."""

    METRICS: ClassVar[dict[str, str]] = {"accuracy": "max"}
    """Evaluation metrics and their direction (`max` or `min`); the first is the primary one: Tune's objective,
    checkpoint retention's "best", the promotion gate's "beats". Each is reported as `val_<name>`."""

    def __init__(self, info: DataInfo | None = None, name: str = "", **options: Any):
        self.info = info
        self.name = name or type(self).__name__
        self.options = options

    # -- the description -------------------------------------------------------------------------------
    @property
    def primary_metric(self) -> str:
        return next(iter(self.METRICS))

    @property
    def mode(self) -> str:
        return self.METRICS[self.primary_metric]

    def objective(self, metric: str | None = None) -> tuple[str, str]:
        """(Tune metric, mode) for tune.metric (None: the primary metric). ConfigError for an unknown one."""
        if metric is None:
            return f"val_{self.primary_metric}", self.mode
        if metric == "val_loss":
            return metric, "min"
        name = metric.removeprefix("val_")
        if not metric.startswith("val_") or name not in self.METRICS:
            raise ConfigError(
                f"tune.metric={metric}: task {self.name} reports "
                f"{', '.join(['val_loss', *(f'val_{m}' for m in self.METRICS)])}; pick one of them"
            )
        return metric, self.METRICS[name]

    def better(self, a: float, b: float) -> bool:
        """Whether primary-metric value `a` strictly beats `b`."""
        return a > b if self.mode == "max" else a < b

    def bind(self, info: DataInfo) -> Task:
        """This task with the data stage's description (workers rebuild the task from it)."""
        self.info = info
        return self

    # -- data ------------------------------------------------------------------------------------------
    def check_source(self, cfg: DataConfig) -> None:
        """Checks that need no Ray (the file exists, its columns), run before Ray starts. Raise DataError."""

    def load(self, cfg: DataConfig) -> Splits:
        """Read cfg's source with Ray Data into train/val/test Datasets of `x` (model input) and `y` (target),
        split reproducibly; fit preprocessing on the train split; return them with their DataInfo."""
        raise NotImplementedError(f"task {self.name} does not implement load(cfg)")

    def example_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """A batch shaped like the training data (created on the current default device): what the plan
        counts the training step on."""
        assert self.info is not None
        y = (
            torch.zeros(rows, dtype=torch.long)
            if self.info.classes is not None
            else torch.zeros(rows, self.info.output_width)
            if self.info.output_width > 1
            else torch.zeros(rows)
        )
        return {"x": torch.zeros(rows, *self.info.input_shape), "y": y}

    # -- the model -------------------------------------------------------------------------------------
    def net_shape(self) -> tuple[int, int]:
        """(in_features, outputs) the model factory is called with: the encoder's output width."""
        assert self.info is not None
        return math.prod(self.info.input_shape), self.info.output_width

    def encoder(self) -> nn.Module:
        return nn.Identity()

    def decoder(self) -> nn.Module:
        return nn.Identity()

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        from shipyard.tasks.models import build_model

        in_features, outputs = self.net_shape()
        return TaskModel(self.encoder(), build_model(model_cfg, in_features, outputs), self.decoder())

    # -- training and evaluation -----------------------------------------------------------------------
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (training_step weights micro-batches by their rows)."""
        raise NotImplementedError(f"task {self.name} does not implement loss(outputs, targets)")

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Every metric of METRICS (plus `loss`) over a whole split's outputs and targets."""
        raise NotImplementedError(f"task {self.name} does not implement metrics(outputs, targets)")

    # -- serving ---------------------------------------------------------------------------------------
    def parse_instances(self, instances: list[Any]) -> np.ndarray:
        """A request's instances as one model input batch; RequestError names the bad instance."""
        assert self.info is not None
        shape = tuple(self.info.input_shape)
        try:
            x = np.asarray(instances, dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise RequestError(f"instances must be arrays of numbers of shape {list(shape)}: {err}") from None
        if x.shape[1:] != shape:
            raise RequestError(f"instances have shape {list(x.shape[1:])}; the model takes {list(shape)}")
        if not np.isfinite(x).all():
            raise RequestError(f"instances[{int(np.argwhere(~np.isfinite(x))[0][0])}] holds NaN or Infinity")
        return x

    def instances(self, x: np.ndarray) -> list[Any]:
        """Encoded input rows (a split's `x`) as a client sends them: the inverse of `parse_instances`. The
        pipeline's endpoint check sends the test split this way."""
        return x.tolist()

    def inputs(self) -> list[dict[str, Any]]:
        """The request schema `/metadata` shows."""
        assert self.info is not None
        return [{"name": "x", "kind": "array", "shape": self.info.input_shape}]

    def answers(self, outputs: np.ndarray) -> list[Any]:
        """The endpoint's answer for each output row: a class name (classification), else the numbers."""
        assert self.info is not None
        if self.info.classes is not None:
            return [self.info.classes[i] for i in outputs.argmax(1).tolist()]
        return outputs.reshape(len(outputs), -1)[:, 0].tolist() if self.info.output_width == 1 else outputs.tolist()

    def encoding(self) -> tuple:
        """What decides how raw values become a split's arrays: two versions with the same encoding read each
        other's test splits as they are; otherwise the rows go through `reencode`."""
        assert self.info is not None
        return (
            self.info.task,
            tuple(self.info.input_shape),
            tuple(self.info.feature_names),
            tuple(self.info.classes) if self.info.classes is not None else None,
            json.dumps(self.info.preprocessing.get("categorical"), sort_keys=True, default=str),
        )

    def score_answers(self, answers: list[Any], targets: np.ndarray) -> float:
        """The primary metric of the endpoint's answers on a split whose encoded targets are `targets`."""
        assert self.info is not None
        if self.info.classes is not None:
            expected = np.asarray(self.info.classes, dtype=object)[targets]
            return float(np.mean([a == e for a, e in zip(answers, expected)]))
        outputs = torch.as_tensor(np.asarray(answers, dtype=np.float32)).reshape(len(answers), -1)
        return self.metrics(outputs, torch.as_tensor(targets))[self.primary_metric]


BUILTIN_TASKS = {
    "classification": "shipyard.tasks.tabular:Classification",
    "regression": "shipyard.tasks.tabular:Regression",
    "image_classification": "shipyard.tasks.images:ImageClassification",
}


def task_class(name: str) -> type[Task]:
    """The class of a task by config spelling: a built-in name or `package.module:Class`."""
    path = BUILTIN_TASKS.get(name, name)
    if ":" not in path:
        raise ConfigError(
            f"task.name '{name}' is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor an "
            "import path 'package.module:Class'"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"task.name '{name}': cannot import module '{module_name}' ({err}); is it installed or on PYTHONPATH?"
        ) from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task.name '{name}': '{module_name}.{attr}' is not a subclass of shipyard.tasks.Task")
    return cls


def make_task(cfg: TaskConfig, info: DataInfo | dict[str, Any] | None = None) -> Task:
    """The configured task, bound to the data stage's description when given."""
    if isinstance(info, dict):
        info = DataInfo.from_dict(info)
    cls = task_class(cfg.name)
    if cfg.options and cls.__init__ is Task.__init__:
        raise ConfigError(f"task.options {sorted(cfg.options)}: task {cfg.name} takes no options; remove them")
    try:
        return cls(info, name=cfg.name, **cfg.options)
    except TypeError as err:
        raise ConfigError(f"task.options {sorted(cfg.options)} do not fit task {cfg.name}: {err}") from err


def reencode(source: Task, target: Task, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A split encoded by `source` (x: its category indices, y: its class indices) as `target` encodes the same
    raw rows: back to raw values (`instances`), then `target.parse_instances`; classes mapped by name. The
    promotion gate scores a champion trained on other data this way. ValueError (RequestError) when `target`
    cannot take these rows: other columns, or classes it never learnt."""
    x_target = target.parse_instances(source.instances(x))
    if source.info.classes is None:
        return x_target, y
    if target.info.classes is None:
        raise ValueError(f"this split's targets are classes; task {target.name} answers numbers")
    index = {c: i for i, c in enumerate(target.info.classes)}
    labels = [source.info.classes[int(t)] for t in y]
    unknown = sorted({str(c) for c in labels if c not in index})
    if unknown:
        raise ValueError(f"it never learnt the class(es) {', '.join(unknown[:5])} of this split")
    return x_target, np.array([index[c] for c in labels], dtype=np.int64)


def objective(cfg: Any) -> tuple[str, str]:
    """(metric, mode) of a search, checkpoint retention and the search's plots: tune.metric, or the task's
    primary metric, with the task's direction for it."""
    return make_task(cfg.task).objective(cfg.tune.metric)


def task_of(info: DataInfo | dict[str, Any], options: dict[str, Any] | None = None) -> Task:
    """The task a description was made by (a registered model's metadata names it)."""
    info = DataInfo.from_dict(info) if isinstance(info, dict) else info
    return task_class(info.task)(info, name=info.task, **(options or {}))
