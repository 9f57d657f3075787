"""PBT's decisions about a search space, without Ray: which keys it may mutate in a running trial (not those
that change the model's parameter shapes) and how a perturbed value stays in the range the user gave.

    mutated, kept = pbt_keys(cfg, in_features, num_classes)   # kept: key -> the shape difference it makes
"""

from __future__ import annotations

from typing import Any

import torch

from shipyard.config import Config, ModelConfig, apply_overrides
from shipyard.errors import ConfigError
from shipyard.tasks.models import build_model


def _space_values(spec: dict[str, list[Any]]) -> list[Any]:
    """The values of a space entry that bound what a trial can get: every choice, or a range's two ends (Tune's
    randint excludes its high)."""
    ((dist, args),) = spec.items()
    if dist in ("choice", "grid"):
        return list(args)
    return [args[0], args[1] - 1] if dist == "randint" else list(args)


def param_shapes(model: ModelConfig, in_features: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model's state_dict, built on the meta device (no memory, no init)."""
    try:
        with torch.device("meta"):
            built = build_model(model, in_features, num_classes)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a factory computing on real tensors while it builds: build it for real
        built = build_model(model, in_features, num_classes)
    return {name: tuple(t.shape) for name, t in built.state_dict().items()}


def shape_keys(cfg: Config, in_features: int, num_classes: int) -> dict[str, str]:
    """Keys of tune.space whose values give models of different parameter shapes, each with the first difference
    (`model.hidden=64 vs 256: 0.weight (64, 64) vs (256, 64)`). Only `model.*` keys can: the model is built from
    the model section alone. Each key is varied alone over its choices (or a range's ends) on the config's other
    values. A value the model does not build with is a ConfigError naming the key."""
    out: dict[str, str] = {}
    for key, spec in cfg.tune.space.items():
        if not key.startswith("model."):
            continue
        seen: list[tuple[Any, dict[str, tuple[int, ...]]]] = []
        for value in _space_values(spec):
            model = apply_overrides(cfg, {key: value}, source=f"tune.space.{key}").model
            try:
                seen.append((value, param_shapes(model, in_features, num_classes)))
            except Exception as err:
                raise ConfigError(
                    f"tune.space.{key}: model.name={model.name} does not build with {key}={value!r} "
                    f"({type(err).__name__}: {err}); fix the value or the model"
                ) from err
        (first, shapes), *rest = seen
        for value, other in rest:
            if other != shapes:
                name = next(n for n in [*shapes, *other] if shapes.get(n) != other.get(n))
                out[key] = (
                    f"{key}={first!r} vs {value!r}: {name} {shapes.get(name, 'absent')} vs {other.get(name, 'absent')}"
                )
                break
    return out


def pbt_keys(cfg: Config, in_features: int, num_classes: int) -> tuple[list[str], dict[str, str]]:
    """Which tune.space keys PBT may mutate in a running trial, and which it must keep as each trial sampled them
    (key -> why): a key that changes the model's parameter shapes, since a trial cannot load weights of another
    shape. An exploit copies the cloned trial's whole config with its checkpoint, so the kept keys still travel
    with the weights they fit. ConfigError when no key is left to mutate."""
    fixed = shape_keys(cfg, in_features, num_classes)
    mutated = [k for k in cfg.tune.space if k not in fixed]
    if not mutated:
        raise ConfigError(
            f"tune.scheduler=pbt: every key of tune.space changes the model's parameter shapes "
            f"({'; '.join(fixed.values())}), and a trial cannot continue from weights of another shape, so PBT has "
            f"nothing to mutate. Add a key it can mutate (e.g. train.lr: {{loguniform: [0.0005, 0.01]}}) or use "
            f"tune.scheduler=asha"
        )
    return mutated, fixed


def clip_to_space(config: dict[str, Any], space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """A PBT-perturbed trial config with each range key put back inside the range the user gave: PBT multiplies by
    0.8 or 1.2 without bounds, and a value such as model.dropout 1.08 would fail the trial's config."""
    out = dict(config)
    for key, spec in space.items():
        ((dist, args),) = spec.items()
        if key in out and dist in ("uniform", "loguniform", "randint"):
            low, high = _space_values(spec)
            out[key] = type(out[key])(min(max(out[key], low), high))
    return out
