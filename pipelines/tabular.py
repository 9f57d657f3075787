"""The tabular pipeline: any parquet/CSV classification file to a live endpoint.

    python -m pipelines.tabular data.path=my.csv data.label=species [key=value ...]

The registered model is named after the file (tabular-<stem>) unless tracking.model_name is set.
"""
import re
import sys
from pathlib import Path

from shipyard.cli import pipeline_main
from shipyard.config import parse_overrides

CONFIG = Path(__file__).parent / "configs" / "tabular.yaml"


def defaults_for(argv: list[str]) -> dict:
    """A model name per data file, so two different tables never compete for one champion."""
    given = parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    path = given.get("data.path")
    if path and "tracking.model_name" not in given and "name" not in given:
        return {"name": "tabular-" + re.sub(r"[^A-Za-z0-9_-]+", "-", Path(str(path)).stem).strip("-")}
    return {}


if __name__ == "__main__":
    sys.exit(pipeline_main(CONFIG, description=__doc__, defaults=defaults_for(sys.argv[1:])))
