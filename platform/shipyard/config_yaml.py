"""The YAML dialect of config files: `1e-4` is a float (YAML 1.1 reads it as a string), and a string that would
read back as a float is quoted when a config is written."""

from __future__ import annotations

import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; read it as the float every user means."""


class Dumper(yaml.SafeDumper):
    """Quotes strings such as "1e5" that Loader would read back as floats."""


for _cls in (Loader, Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
            r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
        ),
        list("-+0123456789."),
    )


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
