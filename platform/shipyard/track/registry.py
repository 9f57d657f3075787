"""The MLflow model registry as the endpoint sees it: model URIs, loading a version for serving,
and the `champion` alias with its history (for `shipyard promote` and `shipyard rollback`).

MLflow keeps only where an alias points now, not where it pointed; the history of champions is kept
as a JSON list in the registered model's tag `shipyard.champion_history`.

A version being promoted carries the claim of its promoter (shipyard.track.promotion.steps): the tag
`shipyard.promotion=pending` and `shipyard.promotion_claim=<deciding|settled> <unix seconds>`. When the promoter
is done, `shipyard.promotion` holds the reason of its decision and the claim tag is gone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.errors import ServingError
from shipyard.track.promotion import DECIDING, Claim, View, next_history

log = logging.getLogger(__name__)

CHAMPION = "champion"
EXPORTED_MODEL_FILE = "model.pt2"
"""What mlflow.pytorch writes for serialization_format="pt2" (torch.export.save)."""
HISTORY_TAG = "shipyard.champion_history"
PROMOTION_TAG = "shipyard.promotion"
CLAIM_TAG = "shipyard.promotion_claim"
PENDING = "pending"


@dataclass(frozen=True)
class ModelRef:
    """`models:/name@alias` or `models:/name/3`, parsed."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        rest = uri[len("models:/") :] if uri.startswith("models:/") else None
        if not rest or rest.startswith(("/", "@")):
            raise ServingError(
                f"model must be a registry URI models:/<name>@<alias> or models:/<name>/<version> "
                f"(e.g. models:/digits@champion), got {uri!r}"
            )
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return cls(name, alias=alias)
        name, _, version = rest.partition("/")
        if not version.isdigit():
            raise ServingError(f"{uri!r}: the version after the model name must be a number, e.g. models:/{name}/3")
        return cls(name, version=version)

    def resolve(self) -> str:
        """The version number this reference points at now."""
        if self.version is not None:
            return self.version
        import mlflow

        try:
            return str(mlflow.MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except mlflow.exceptions.MlflowException as err:
            raise ServingError(
                f"registered model {self.name!r} has no alias {self.alias!r} in the registry at "
                f"{mlflow.get_registry_uri()}: {err.message}"
            ) from err


@dataclass(frozen=True)
class ServedModel:
    """One registered version, loaded, with the task that parses its requests and forms its answers."""

    name: str
    version: str
    model: Any = field(repr=False)
    task: Any = field(repr=False)
    """shipyard.tasks.Task bound to the DataInfo stored with the version."""
    num_features: int
    dtype: np.dtype
    classes: list[Any] | None
    feature_names: list[str] | None

    def predict(self, x: np.ndarray) -> list[Any]:
        """Answers for a batch the task parsed (class names, numbers)."""
        import torch

        with torch.no_grad():
            outputs = self.model(torch.from_numpy(x)).float().numpy()
        return self.task.answers(outputs)

    def schema(self) -> dict[str, Any]:
        return {
            "features": self.num_features,
            "dtype": str(self.dtype),
            "feature_names": self.feature_names,
            "task": self.task.name,
            "inputs": self.task.inputs(),
            "target": self.task.info.target,
        }


def load(name: str, version: str) -> ServedModel:
    """Load `models:/name/version` (torch.export weights and graph: no pickle is unpickled) and its task."""
    import mlflow

    from shipyard.tasks import DataInfo, task_of

    uri = f"models:/{name}/{version}"
    info = mlflow.models.get_model_info(uri)
    spec = info.signature.inputs.to_dict()[0] if info.signature else {}
    tensor = spec.get("tensor-spec")
    if not tensor or len(tensor.get("shape") or ()) < 2:
        raise ServingError(
            f"{uri} has no tensor signature ({spec or 'no signature'}); Shipyard serves models "
            "logged by its pipeline (shipyard.track.runs.log_model), whose signature is [-1, ...]"
        )
    meta = info.metadata or {}
    shape = [int(d) for d in tensor["shape"][1:]]
    data_info = (
        meta.get("data_info")
        or DataInfo(  # logged before tasks: a classifier on rows of numbers
            task="classification",
            input_shape=shape,
            output_width=len(meta.get("classes") or []),
            target="label",
            feature_names=meta.get("feature_names") or [],
            classes=meta.get("classes"),
        ).to_dict()
    )
    try:
        task = task_of(data_info, meta.get("task_options"))
    except Exception as err:  # a user task whose module this replica cannot import
        raise ServingError(
            f"{uri} was trained with task {data_info.get('task')!r}, which cannot be loaded here: {err}"
        ) from err
    model = load_torch(uri)
    return ServedModel(
        name,
        version,
        model,
        task,
        int(np.prod(shape)),
        np.dtype(tensor["dtype"]),
        meta.get("classes"),
        meta.get("feature_names"),
    )


def load_torch(uri: str):
    """The torch model at `uri`, only if it is in torch.export form; anything else is refused before a byte
    of it is unpickled: unpickling runs whatever code the file names, and a registry holds what anyone with write
    access put there. Not `mlflow.pytorch.load_model`: it follows the MLmodel file (which data folder, a `code`
    folder put on sys.path, a pickle module it imports) and, unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
    (its default is true), skips its own check of the .pt2 archive. Here: the MLmodel must name data/ and no
    code, data/ must hold model.pt2 alone, MLflow's check runs always, then torch.export.load."""
    import mlflow
    import torch
    import yaml

    from shipyard.private_apis import check_pt2_is_pickle_free

    local = Path(mlflow.artifacts.download_artifacts(uri))
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["pytorch"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ServingError(
            f"{uri} has no readable MLmodel with a pytorch flavor ({type(err).__name__}: {err}); "
            "Shipyard serves models logged by its pipeline (shipyard.track.runs.log_model)"
        ) from None
    data = local / "data"
    found = sorted(p.name for p in data.iterdir()) if data.is_dir() else []
    if flavor.get("model_data") != "data" or flavor.get("code") or found != [EXPORTED_MODEL_FILE]:
        raise ServingError(
            f"{uri} is not a torch.export model (MLmodel: model_data={flavor.get('model_data')!r}, "
            f"code={flavor.get('code')!r}; data/ holds {found or 'nothing'}; expected data/ with "
            f"only {EXPORTED_MODEL_FILE} and no code): a pickled model runs arbitrary code when loaded, "
            "so Shipyard refuses it. Re-register it through the pipeline (shipyard.track.runs.log_model "
            "saves torch.export weights and graph)"
        )
    path = data / EXPORTED_MODEL_FILE
    try:
        check_pt2_is_pickle_free(str(path))  # every record JSON, text or weights_only-loadable
    except mlflow.exceptions.MlflowException as err:
        raise ServingError(f"{uri} refused: {str(err).splitlines()[0][:300]}") from None
    return torch.export.load(str(path)).module()


# -- the champion alias and its history ---------------------------------------------------------------


def champion_version(name: str) -> str | None:
    import mlflow

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def champion_history(name: str) -> list[str]:
    import mlflow

    tags = mlflow.MlflowClient().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def set_champion(name: str, version: str, reason: str) -> str | None:
    """Point `champion` at `version`, append it to the history; returns the version it pointed at before.

    A running endpoint serving `models:/name@champion` notices within its `refresh_s` and swaps in place.
    """
    import mlflow

    client = mlflow.MlflowClient()
    client.get_model_version(name, version)  # raises with MLflow's own message when it does not exist
    before = champion_version(name)
    move_champion(name, version, next_history(champion_history(name), before, version))
    client.set_model_version_tag(name, version, PROMOTION_TAG, reason)
    log.info("%s: champion v%s -> v%s (%s)", name, before, version, reason)
    return before


def move_champion(name: str, version: str, history: list[str] | tuple[str, ...]) -> None:
    """The alias, then its history: the two writes of a move (neither touches the version's own tags)."""
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    write_history(name, history)


def write_history(name: str, history: list[str] | tuple[str, ...]) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_tag(name, HISTORY_TAG, json.dumps(list(history)))


# -- promotion claims (shipyard.track.promotion.steps) --------------------------------------------------------


def promotion_view(name: str) -> View:
    """The versions claimed by a promoter (one request), then the alias and its history (a second one): in this
    order a promoter that finds no claim deciding reads, after that moment, the champion it reports."""
    import mlflow

    client = mlflow.MlflowClient()
    claims = []
    for mv in client.search_model_versions(f"name = '{name}' and tags.`{PROMOTION_TAG}` = '{PENDING}'"):
        phase, _, at = mv.tags.get(CLAIM_TAG, "").partition(" ")
        try:
            heartbeat = float(at)
        except ValueError:  # pending without a claim: tagged by hand or by an older Shipyard, never fresh
            heartbeat = 0.0
        claims.append(Claim(str(mv.version), phase, heartbeat))
    model = client.get_registered_model(name)
    champion = model.aliases.get(CHAMPION)
    return View(
        None if champion is None else str(champion),
        tuple(json.loads(model.tags.get(HISTORY_TAG, "[]"))),
        tuple(claims),
        time.time(),
    )


def mark_claim(name: str, version: str, phase: str) -> None:
    """The claim's phase and heartbeat, then (deciding) the pending tag that makes it found: pending always has
    a claim tag."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, CLAIM_TAG, f"{phase} {time.time():.3f}")
    if phase == DECIDING:
        client.set_model_version_tag(name, version, PROMOTION_TAG, PENDING)


def release_claim(name: str, version: str, reason: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, PROMOTION_TAG, reason)
    client.delete_model_version_tag(name, version, CLAIM_TAG)


def rollback(name: str) -> tuple[str, str]:
    """Put the previous champion back; returns (from_version, to_version)."""
    import mlflow

    current = champion_version(name)
    history = champion_history(name)
    if current is not None and history and history[-1] != current:
        history.append(current)  # the alias was moved outside Shipyard: roll back from where it is now
    if len(history) < 2:
        raise ServingError(
            f"no previous champion of {name!r} is recorded (history {history}); pick a version "
            f"with `shipyard promote {name} <version>`"
        )
    history.pop()
    previous = history[-1]
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, previous, PROMOTION_TAG, f"rolled back from v{current}")
    log.info("%s: champion rolled back v%s -> v%s", name, current, previous)
    return str(current), previous
