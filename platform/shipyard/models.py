"""Model factories: built-ins by name, or any user factory by import path `package.module:function`.

A factory is called as `factory(in_features, num_classes, hidden=..., depth=..., dropout=..., **options)`
and returns a `torch.nn.Module` mapping a float32 batch `(N, in_features)` to logits `(N, num_classes)`.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from shipyard.errors import ConfigError

if TYPE_CHECKING:  # the factories run where only torch is installed (bench/gpu_check.sh)
    from shipyard.config import ModelConfig


def mlp(in_features: int, num_classes: int, hidden: int = 128, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv blocks over a square single-channel image given as a flat row (8x8 digits -> 64 features)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ConfigError(
                f"model.name=cnn needs a square image as features, got {in_features} features; use model.name=mlp")
        self.side = side
        blocks: list[nn.Module] = []
        channels = 1
        for _ in range(depth):
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
            channels = hidden
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, self.side, self.side)))


def cnn(in_features: int, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    return SmallCNN(in_features, num_classes, hidden, depth, dropout)


class SmallTransformer(nn.Module):
    """A transformer encoder over the features as a sequence of tokens: the rows of a square image (8x8
    digits -> 8 tokens of 8 features), else one feature per token. Mean-pooled, then a linear head."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 2, dropout: float = 0.1,
                 heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"model.name=transformer: model.hidden ({hidden}) must be a multiple of "
                              f"model.options.heads ({heads})")
        side = math.isqrt(in_features)
        self.token_features = side if side * side == in_features else 1
        tokens = in_features // self.token_features
        self.embed = nn.Linear(self.token_features, hidden)
        self.position = nn.Parameter(torch.zeros(1, tokens, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.view(x.shape[0], -1, self.token_features)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


def transformer(in_features: int, num_classes: int, hidden: int = 64, depth: int = 2, dropout: float = 0.1,
                heads: int = 4) -> nn.Module:
    return SmallTransformer(in_features, num_classes, hidden, depth, dropout, heads)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"model.name '{name}' is neither a built-in ({', '.join(BUILTIN)}) nor an import path "
            "'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model.name '{name}': cannot import module '{module_name}' ({err}); "
                          "is it installed or on PYTHONPATH?") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name '{name}': '{module_name}' has no callable '{attr}'")
    return factory


def build_model(cfg: "ModelConfig", in_features: int, num_classes: int) -> nn.Module:
    """Instantiate the configured model; unknown keyword arguments are a ConfigError, not a TypeError."""
    factory = resolve_factory(cfg.name)
    kwargs: dict[str, Any] = {"hidden": cfg.hidden, "depth": cfg.depth, "dropout": cfg.dropout, **cfg.options}
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg.options) - set(params))
        if unknown:
            raise ConfigError(f"model.options {unknown} are not arguments of {cfg.name}; "
                              f"it accepts {', '.join(list(params)[2:])}")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    model = factory(in_features, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name '{cfg.name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
