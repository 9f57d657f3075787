"""A user's own model factory, referenced by import path in tests: tests.unit.user_models:linear."""

from torch import nn


def linear(in_features: int, num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, num_classes, bias=bias)


def not_a_module(in_features: int, num_classes: int):
    return "oops"
