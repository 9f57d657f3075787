"""One typed config tree for every Shipyard pipeline; the only home of defaults.

    cfg = load_config("pipelines/configs/digits.yaml", ["train.lr=0.01", "tune.num_samples=4"])

A YAML file holds an experiment's differences from the defaults below; `key=value` arguments
hold one-off changes. The same dotted spelling (`train.lr`) is used in YAML, on the command line,
in the Tune search space, in MLflow params and in error messages.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from shipyard.config_yaml import Dumper as _Dumper
from shipyard.config_yaml import load as _yaml_load
from shipyard.errors import ConfigError
from shipyard.scaling_config import ScalingConfig  # noqa: F401 (re-exported: shipyard.config.ScalingConfig)
from shipyard.serve_config import AutoscalingConfig, EndpointConfig, InPlaceConfig, ServeConfig  # noqa: F401
from shipyard.serve_config import Section as _Section

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: platform/shipyard/config.py -> ../../."""


class DataConfig(_Section):
    builtin: Literal["digits"] | None = None
    """A data set that ships with the platform (no download). Exactly one of `builtin` and `path`."""
    path: str | None = None
    """A parquet or CSV file (or a folder of them) read with Ray Data; for task.name=image_classification, a
    folder of class subfolders of images."""
    label: str = "label"
    """Name of the label (or regression target) column in `path`; every other column is a feature."""
    image_size: int = Field(32, ge=1)
    """image_classification: every image is resized to image_size x image_size (PIL, bilinear)."""
    channels: Literal[1, 3] = 3
    """image_classification: 1 (grayscale) or 3 (RGB); images are converted to it."""
    skip_bad_files: bool = False
    """image_classification: skip (and count) files that do not decode, instead of stopping the run."""
    augment_crop_pad: int = Field(0, ge=0)
    """image_classification, training only: pad by this many pixels and crop back at a random offset."""
    augment_flip: bool = False
    """image_classification, training only: flip half the images horizontally."""
    max_categories: int = Field(50, ge=2)
    """A text feature column with at most this many distinct values in the train split is one-hot encoded (its
    categories learned there); more is free text or an identifier, and stops the run naming the column."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    """Seed of the train/val/test split: the same file and seed give the same split on any cluster."""

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.builtin is None) == (self.path is None):
            raise ValueError(
                "set exactly one of data.builtin (e.g. digits) and data.path (a .csv or .parquet file, or a folder "
                "of class subfolders of images)"
            )
        return self


class ModelConfig(_Section):
    name: str = "mlp"
    """A built-in factory (`mlp`, `cnn`, `transformer`) or a user factory `package.module:function`."""
    hidden: int = Field(128, ge=1)
    """Width of hidden layers (MLP units, CNN channels)."""
    depth: int = Field(2, ge=1)
    """Number of hidden layers (MLP) or conv blocks (CNN)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to a user factory."""


class TaskConfig(_Section):
    name: str = "classification"
    """What is trained: `classification` or `regression` on a table (data.path or a built-in set), or a user
    task `package.module:Class` (a subclass of shipyard.tasks.Task). The task reads the data, owns the loss,
    the metrics and the primary metric's direction, and turns model outputs into the endpoint's answers."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to a user task's constructor."""


class TrainConfig(_Section):
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1)
    """Global batch size across all Ray Train workers."""
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts from the last checkpoint before the run fails (Ray Train FailureConfig)."""
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    """bf16-mixed: the forward under torch.autocast(bfloat16) (CPU and GPU), the loss in fp32; weights and optimizer
    in fp32."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step: each worker's share of train.batch_size is split in this many, their
    gradients summed (DDP synchronises only on the last one). The gradient of one batch, less activation memory
    (for models without batch statistics: BatchNorm normalizes each micro-batch by its own)."""
    grad_clip_norm: float | None = Field(None, gt=0)
    """Clip the gradients' global L2 norm to this before each optimizer step (torch.nn.utils.clip_grad_norm_)."""


Distribution = Literal["uniform", "loguniform", "randint", "choice", "grid"]


class TuneConfig(_Section):
    enabled: bool = True
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int | Literal["auto"] = 2
    """Trials at once; `auto`: as many as fit the cluster's CPUs (tune.cpus_per_trial each), up to num_samples."""
    scheduler: Literal["asha", "hyperband", "pbt", "fifo"] = "asha"
    """asha: asynchronous successive halving (stops weak trials at rungs); hyperband: synchronous brackets of
    successive halving (pauses trials at a rung until their bracket catches up); pbt: population-based training
    (weak trials copy a strong one's checkpoint and perturb its hyperparameters); fifo: every trial runs all
    train.epochs."""
    search: Literal["random", "optuna"] = "random"
    """random: sample tune.space (grid entries are crossed); optuna: Optuna's TPE proposes each next trial."""
    metric: str | None = None
    """What the search optimises: `val_<metric>` of the task (val_accuracy, val_rmse, ...) or val_loss; default
    the task's primary metric (classification: val_accuracy, max; regression: val_rmse, min). Its direction
    comes from the task."""
    grace_period: int = Field(3, ge=1)
    """ASHA: epochs every trial gets before it can be stopped."""
    reduction_factor: float = Field(3, gt=1)
    """ASHA, HyperBand: only 1/reduction_factor of the trials reaching a rung go on to the next."""
    perturbation_interval: int = Field(2, ge=1)
    """PBT: epochs between exploit/explore steps."""
    cpus_per_trial: float = Field(1.0, gt=0)
    """CPUs one trial holds, shared by its workers_per_trial workers."""
    workers_per_trial: int = Field(1, ge=1)
    """1: a trial is one process; N > 1: a trial is a Ray Train job of N data-parallel workers."""
    keep_checkpoints: int = Field(3, ge=1)
    """Checkpoints kept across the whole search: the best K by tune.metric (plus the latest of each trial still
    running and the best trial's last one); the rest are deleted as the search goes."""
    seed: int = 0
    """Seed of the search algorithm: the same seed samples the same trial configs."""
    space: dict[str, dict[Distribution, list[Any]]] = Field(default_factory=dict)
    """Search space: `{"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.hidden": {"choice": [64, 128]}}`."""

    @field_validator("max_concurrent_trials", mode="before")
    @classmethod
    def _at_once(cls, v: Any) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("give a number of trials >= 1, or auto (as many as fit the cluster), e.g. 2 or auto")


class TrackingConfig(_Section):
    uri: str | None = None
    """MLflow tracking URI; default: a sqlite file under .shipyard/ in the project."""
    experiment: str = "shipyard"
    model_name: str | None = None
    """Registered model name; default: the pipeline's name (plus the data file's stem for data.path)."""


class PlanConfig(_Section):
    enabled: bool = True
    """Predict step and epoch time before training (shipyard.perf), show an ETA, log predicted next to measured
    step time per epoch, and warn when they differ by more than warn_off_by."""
    hardware: str = "local"
    """What the prediction prices: `local` (the calibrated profile of the Ray nodes' CPUs) or catalog hardware
    for GPU workers (`a100`, `h100`, `h200`; `shipyard plan --help`)."""
    profile: str = ".shipyard/hardware.json"
    """The hardware profile `shipyard calibrate` writes; relative paths are under the project root. When it is
    missing, the pipeline measures this machine first (~35 s) and writes it."""
    warn_off_by: float = Field(0.25, gt=0)
    """Warn (once per run) when the measured step time is off the prediction by more than this fraction."""
    measure: bool = False
    """Before training, run the model's real step on the driver's CPU for a few seconds and predict from it, op
    by op (the measured mode of `shipyard plan --measure`); the analytical prediction is logged beside it
    (param plan.analytical_step_time_ms). Local CPU plans only (plan.hardware=local). Off by default until
    bench/perfmodel.py shows it closer than the analytical plan (BENCHMARKS.md: not yet)."""


class Config(_Section):
    name: str = "digits"
    """Pipeline name: names the MLflow parent run, the Ray runs and (by default) the registered model."""
    data: DataConfig = Field(default_factory=lambda: DataConfig(builtin="digits"))
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    storage_path: str = ".shipyard/ray_results"
    """Where Ray Train/Tune write checkpoints; relative paths are under the project root."""

    # -- derived values ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """tracking.model_name, else the pipeline name, plus the file's stem for a data file: two different
        tables never compete for one champion."""
        if self.tracking.model_name:
            return self.tracking.model_name
        if self.data.path:
            stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(self.data.path.rstrip("/")).stem).strip("-")
            return f"{self.name}-{stem}" if stem else self.name
        return self.name

    @property
    def tracking_uri(self) -> str:
        uri = self.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # relative (to the current folder): Train workers and Tune trials run in other folders and
            # would each open a new DB
            return f"sqlite:///{Path(uri[len('sqlite:///') :]).expanduser().resolve()}"
        if uri:
            return uri
        # absolute: Tune trials chdir into their trial folder (tracking.setup creates the folder)
        return f"sqlite:///{PROJECT_ROOT / '.shipyard' / 'mlflow.db'}"

    @property
    def storage_dir(self) -> Path:
        p = Path(self.storage_path)
        return p if p.is_absolute() else PROJECT_ROOT / p

    def flat(self) -> dict[str, Any]:
        """The tree as `{"train.lr": 0.003, ...}`: MLflow params and Tune keys use this spelling."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)


# -- loading and overriding ------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("space", "options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return out


def valid_keys() -> list[str]:
    """Every dotted key a user may set, e.g. `train.lr`."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    walk(Config, "")
    return keys


def _check_key(key: str, where: str = "") -> None:
    keys = valid_keys()
    top = key.split(".")[0]
    if key in keys or (f"{top}.options" in keys and key.startswith(f"{top}.options.")):
        return
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = [k for k in keys if k.startswith(top + ".")]
    listing = f" Keys under '{top}': {', '.join(section)}." if section else f" Valid keys: {', '.join(keys)}."
    loc = f" in {where}" if where else ""
    raise ConfigError(f"unknown key '{key}'{loc}{hint}{listing}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    _check_key(key)
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a section")
    node[parts[-1]] = value


SECTIONS = {
    name
    for name, f in Config.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
}


def _unknown_keys(tree: dict[str, Any], prefix: str = "") -> None:
    """Report unknown keys of a YAML tree with the closest valid spelling, before pydantic does."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if not prefix and k in SECTIONS and v is None:  # a section whose keys are all commented out
            tree[k] = v = {}
        if not prefix and k in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"'{k}' must be a section of keys (e.g. {k}: {{...}}), got {v!r}")
        if isinstance(v, dict) and k not in ("space", "options"):
            _unknown_keys(v, key + ".")
        else:
            _check_key(key)
            if key == "tune.space" and isinstance(v, dict):
                for space_key in v:
                    _check_key(space_key, where="tune.space")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["train.lr=0.01", "tune.enabled=false"]` -> `{"train.lr": 0.01, "tune.enabled": False}` (YAML scalars)."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got '{arg}' (e.g. train.lr=0.01)")
        key, raw = arg.split("=", 1)
        try:
            out[key.strip()] = _yaml_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse the value of '{key}': {raw!r} ({err})") from err
    return out


def apply_overrides(cfg: Config | dict[str, Any], overrides: dict[str, Any], source: str = "overrides") -> Config:
    """A new Config with dotted-key overrides applied; serves both the CLI and Tune trials."""
    tree = copy.deepcopy(cfg.model_dump(mode="json") if isinstance(cfg, Config) else cfg)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return _validate(tree, source)


def _validate(tree: dict[str, Any], source: str) -> Config:
    _unknown_keys(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid config from {source}:\n" + "\n".join(lines)) from err


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply `key=value` overrides. Raises ConfigError."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (configs live in pipelines/configs/)")
        try:
            tree = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (data:, model:, train:, ...)")
        source = str(p)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return _validate(tree, source if not overrides else f"{source} + command line")
