"""Model factories: built-ins by name, or any user factory by import path `package.module:function`.

A factory is called as `factory(in_features, num_classes, hidden=..., depth=..., dropout=..., **options)`
and returns a `torch.nn.Module` mapping a float32 batch `(N, in_features)` to outputs `(N, num_classes)`. For an
image task `in_features` is the image's shape `(C, H, W)` and the batch `(N, C, H, W)`; the built-ins take both.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shipyard.errors import ConfigError

if TYPE_CHECKING:  # the factories run where only torch is installed (bench/gpu_check.sh)
    from shipyard.config import ModelConfig


Shape = int | Sequence[int]


def _image_shape(in_features: Shape, model: str) -> tuple[int, int, int]:
    """(C, H, W) of an image input: given as a shape, or a square single-channel image as a flat row."""
    if not isinstance(in_features, int):
        c, h, w = in_features
        return int(c), int(h), int(w)
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ConfigError(
            f"model.name={model} needs an image: a square number of features (8x8 digits: 64) or an "
            f"image task's [C, H, W]; got {in_features} features. Use model.name=mlp"
        )
    return 1, side, side


def mlp(in_features: Shape, num_classes: int, hidden: int = 128, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    layers: list[nn.Module] = [] if isinstance(in_features, int) else [nn.Flatten()]
    width = in_features if isinstance(in_features, int) else math.prod(in_features)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv blocks over an image: `[C, H, W]`, or a square single-channel image given as a flat row (8x8
    digits -> 64 features)."""

    def __init__(self, in_features: Shape, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        self.shape = _image_shape(in_features, "cnn")
        blocks: list[nn.Module] = []
        channels = self.shape[0]
        for _ in range(depth):
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
            channels = hidden
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.shape)))


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (He et al., "Deep Residual Learning", CVPR 2016, Fig. 2), then ReLU;
    `stride` 2 halves the image and a 1x1 conv matches the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet: a 3x3 stem, `depth` residual blocks (the width doubles and the image halves from the
    second block on, while the image is larger than 4x4), global average pooling, a linear head."""

    def __init__(self, in_features: Shape, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        self.shape = _image_shape(in_features, "resnet")
        c, h, _ = self.shape
        layers: list[nn.Module] = [nn.Conv2d(c, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        width = hidden
        for i in range(depth):
            stride = 2 if i > 0 and h > 4 else 1
            h = (h + 1) // 2 if stride == 2 else h
            out = width * stride
            layers.append(_Residual(width, out, stride))
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.shape)))


def resnet(in_features: Shape, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    return SmallResNet(in_features, num_classes, hidden, depth, dropout)


def cnn(in_features: Shape, num_classes: int, hidden: int = 32, depth: int = 2, dropout: float = 0.1) -> nn.Module:
    return SmallCNN(in_features, num_classes, hidden, depth, dropout)


class SmallTransformer(nn.Module):
    """A transformer encoder over the features as a sequence of tokens: the rows of an image (8x8 digits -> 8
    tokens of 8 features; [C, H, W] -> H tokens of C*W), else one feature per token. Mean-pooled, then a linear
    head."""

    def __init__(
        self,
        in_features: Shape,
        num_classes: int,
        hidden: int = 64,
        depth: int = 2,
        dropout: float = 0.1,
        heads: int = 4,
    ):
        super().__init__()
        if hidden % heads:
            raise ConfigError(
                f"model.name=transformer: model.hidden ({hidden}) must be a multiple of model.options.heads ({heads})"
            )
        self.image = None if isinstance(in_features, int) else tuple(int(d) for d in in_features)
        if self.image is not None:
            c, h, w = self.image
            self.token_features, tokens = c * w, h
        else:
            side = math.isqrt(in_features)
            self.token_features = side if side * side == in_features else 1
            tokens = in_features // self.token_features
        self.embed = nn.Linear(self.token_features, hidden)
        self.position = nn.Parameter(torch.zeros(1, tokens, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image is not None:  # [N, C, H, W] -> H tokens (the image's rows), each of C * W values
            x = x.permute(0, 2, 1, 3)
        tokens = self.embed(x.reshape(x.shape[0], -1, self.token_features)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


def transformer(
    in_features: Shape, num_classes: int, hidden: int = 64, depth: int = 2, dropout: float = 0.1, heads: int = 4
) -> nn.Module:
    return SmallTransformer(in_features, num_classes, hidden, depth, dropout, heads)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "transformer": transformer}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"model.name '{name}' is neither a built-in ({', '.join(BUILTIN)}) nor an import path "
            "'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"model.name '{name}': cannot import module '{module_name}' ({err}); is it installed or on PYTHONPATH?"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model.name '{name}': '{module_name}' has no callable '{attr}'")
    return factory


def build_model(cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Module:
    """Instantiate the configured model; unknown keyword arguments are a ConfigError, not a TypeError."""
    factory = resolve_factory(cfg.name)
    kwargs: dict[str, Any] = {"hidden": cfg.hidden, "depth": cfg.depth, "dropout": cfg.dropout, **cfg.options}
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(cfg.options) - set(params))
        if unknown:
            raise ConfigError(
                f"model.options {unknown} are not arguments of {cfg.name}; it accepts {', '.join(list(params)[2:])}"
            )
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    model = factory(in_features, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name '{cfg.name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
