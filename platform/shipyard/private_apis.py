"""Every private API of Ray and MLflow that Shipyard relies on, behind one module.

A private API can change in any release. Each use below says what it is, the version it was verified on and why
no public API does the job; `tests/unit/test_private_apis.py` runs each entry's `check`, so an upgrade that moves
or changes one fails that test, naming the use, instead of failing a user's run. Everything here imports Ray or
MLflow when called, not when this module is imported.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VERIFIED_ON = {"ray": "2.60.0", "mlflow": "3.17.2", "torch": "2.13.0"}

IN_PLACE = {"perf/layers.py": ("_count_flops", "_schemas")}
"""Uses that cannot sit behind a function here (a subclass overriding torch's hook, an attribute read on every
op it counts): listed in USES all the same, and allowed in place by tests/unit/test_private_apis.py."""


@dataclass(frozen=True)
class PrivateUse:
    name: str
    """The private symbol, as Shipyard reaches it."""
    used_by: str
    """Where in Shipyard, and for what."""
    why: str
    """Why no public API does it."""
    check: Callable[[], None]
    """Raises (AttributeError, ImportError, AssertionError) if an installed version no longer has it."""


def _attr(module: str, *names: str) -> Any:
    obj = importlib.import_module(module)
    for name in names:
        obj = getattr(obj, name)
    return obj


def _in_source(module: str, text: str) -> None:
    source = inspect.getsource(importlib.import_module(module))
    assert text in source, f"{module} no longer mentions {text!r}"


# -- Ray: authentication -----------------------------------------------------------------------------------------


def enable_token_auth_if_token_available() -> None:
    """Switch an already-imported Ray client into token mode when a token exists (Ray reads RAY_AUTH_MODE once,
    at import; its own helper also refreshes the config it read)."""
    _attr("ray._private.authentication.authentication_token_setup", "maybe_enable_token_auth_if_token_available")(
        warn_if_disabled=False
    )


# -- Ray: the cluster launcher's offline pre-flight (`shipyard cluster check`) -----------------------------------


def launcher_provider_types() -> set[str]:
    """The provider types `ray up` knows."""
    return set(_attr("ray.autoscaler._private.providers", "_DEFAULT_CONFIGS"))


def launcher_default_config(provider: dict[str, Any]) -> dict[str, Any]:
    """A provider's default cluster config, as `ray up` merges it."""
    return _attr("ray.autoscaler._private.providers", "_get_default_config")(provider)


def launcher_util() -> Any:
    """ray.autoscaler._private.util: fillout_defaults, prepare_config, validate_config (what `ray up` runs)."""
    return importlib.import_module("ray.autoscaler._private.util")


def launcher_prepare_local(config: dict[str, Any]) -> dict[str, Any]:
    """The local provider's checks of head_ip/worker_ips (raises click.ClickException)."""
    return _attr("ray.autoscaler._private.local.config", "prepare_local")(config)


# -- Ray Data: the loggers of a failed task's traceback ----------------------------------------------------------

RAY_DATA_TRACEBACK_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")
"""Ray Data logs a failed task's traceback (twice) on these loggers before raising it."""


# -- Ray Train / Tune ----------------------------------------------------------------------------------------------


def train_report_queue() -> Any:
    """The queue through which Ray Train hands rank 0's reports to the Tune trial (None outside a session)."""
    session = _attr("ray.train._internal.session", "get_session")()
    return getattr(session, "_inter_actor_queue", None)


def mlflow_client_of(callback: Any) -> Any:
    """The MlflowClient of a Ray Tune MLflowLoggerCallback (after its setup)."""
    return callback.mlflow_util._get_client()


def trial_runs_of(callback: Any) -> dict[Any, str]:
    """MLflowLoggerCallback's map trial -> MLflow run id (read and filled by Shipyard's subclass)."""
    return callback._trial_runs


# -- MLflow --------------------------------------------------------------------------------------------------------


def check_pt2_is_pickle_free(path: Any) -> None:
    """MLflow's own check that a torch.export archive holds no pickle (raises if it does)."""
    _attr("mlflow.pytorch", "_validate_pt2_archive_is_pickle_free")(path)


def _signature_is(fn: Callable, params: list[str]) -> None:
    found = list(inspect.signature(fn).parameters)
    assert found == params, f"parameters are {found}, expected {params}"


def _schemas_of_mm() -> None:
    import torch

    schemas = torch.ops.aten.mm._schemas
    assert next(iter(schemas.values())).returns[0].alias_info is None  # mm returns a new tensor


def _callback_attrs() -> None:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    assert callable(MLflowLoggerCallback().mlflow_util._get_client), "mlflow_util._get_client is not callable"
    _in_source("ray.air.integrations.mlflow", "self._trial_runs = {}")  # set in setup(), which opens MLflow


USES: list[PrivateUse] = [
    PrivateUse(
        "ray._private.authentication.authentication_token_setup.maybe_enable_token_auth_if_token_available",
        "cluster.attach: token mode for a client when Ray was imported before the token was found",
        "Ray exposes only the RAY_AUTH_MODE variable, read once at import; nothing public re-reads it",
        lambda: _attr(
            "ray._private.authentication.authentication_token_setup", "maybe_enable_token_auth_if_token_available"
        ),
    ),
    PrivateUse(
        "ray.autoscaler._private.providers._DEFAULT_CONFIGS, _get_default_config",
        "cluster.launcher: the provider types `ray up` knows and their defaults, checked offline",
        "`ray up` runs these only on the way to creating nodes; no public call validates a file alone",
        lambda: (_attr("ray.autoscaler._private.providers", "_DEFAULT_CONFIGS")["local"], launcher_default_config),
    ),
    PrivateUse(
        "ray.autoscaler._private.util.fillout_defaults, prepare_config, validate_config",
        "cluster.launcher: Ray's own schema validation of a launcher file, every error collected",
        "no public validation entry point for cluster files",
        lambda: [getattr(launcher_util(), n) for n in ("fillout_defaults", "prepare_config", "validate_config")],
    ),
    PrivateUse(
        "ray.autoscaler._private.local.config.prepare_local",
        "cluster.launcher: the local provider's head_ip/worker_ips checks",
        "the same checks run only inside `ray up`",
        lambda: _attr("ray.autoscaler._private.local.config", "prepare_local"),
    ),
    PrivateUse(
        "logger ray.data._internal.execution.streaming_executor_state",
        "data.ray_errors: muted while a data error is turned into one line (Ray Data logs its traceback twice)",
        "Ray Data has no setting to not log a task's traceback before raising it",
        lambda: _in_source("ray.data._internal.execution.streaming_executor_state", "logging.getLogger(__name__)"),
    ),
    PrivateUse(
        "ray.train._internal.session.get_session()._inter_actor_queue",
        "tune.trials: a two-worker trial waits until Tune has read its last report",
        "Ray Train hands reports to Tune through this queue; no public call says whether it is drained",
        lambda: (
            _attr("ray.train._internal.session", "get_session"),
            _in_source("ray.train._internal.session", "self._inter_actor_queue"),
        ),
    ),
    PrivateUse(
        "MLflowLoggerCallback.mlflow_util._get_client, MLflowLoggerCallback._trial_runs",
        "tune.search: a resumed search's trial goes on in its own MLflow run; outcome tags on trial runs",
        "the callback keeps its client and its trial -> run map private and has no hook for either",
        _callback_attrs,
    ),
    PrivateUse(
        "torch.utils.flop_counter.FlopCounterMode._count_flops",
        "perf.layers: the FLOP counter's per-op hook, overridden to record each op's layer, phase and bytes moved",
        "FlopCounterMode reports FLOPs per module only; no public hook sees each op with its output",
        lambda: _signature_is(
            _attr("torch.utils.flop_counter", "FlopCounterMode", "_count_flops"),
            ["self", "func_packet", "out", "args", "kwargs"],
        ),
    ),
    PrivateUse(
        "torch._ops.OpOverloadPacket._schemas",
        "perf.layers: whether an op returns a view (moves no bytes), from its schema's alias info",
        "the schemas of an op's overloads are public only through torch._C; the packet's map is the plain path",
        lambda: _schemas_of_mm(),
    ),
    PrivateUse(
        "mlflow.pytorch._validate_pt2_archive_is_pickle_free",
        "track.registry: a served model is checked for pickles before torch.export.load, always",
        "mlflow.pytorch.load_model runs this check only when MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false",
        lambda: _attr("mlflow.pytorch", "_validate_pt2_archive_is_pickle_free"),
    ),
]
