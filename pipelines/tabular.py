"""The tabular pipeline: any parquet/CSV classification file to a live endpoint.

    python -m pipelines.tabular data.path=my.csv data.label=species [key=value ...]

The registered model is named after the file (tabular-<stem>) unless tracking.model_name is set.
"""

import sys
from pathlib import Path

from shipyard.cli import pipeline_main

CONFIG = Path(__file__).parent / "configs" / "tabular.yaml"

if __name__ == "__main__":
    sys.exit(pipeline_main(CONFIG, description=__doc__))
