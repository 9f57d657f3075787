"""The digits pipeline: 8x8 handwritten digits (bundled with scikit-learn) to a live endpoint.

python -m pipelines.digits [pipelines/configs/digits.yaml] [key=value ...] [--summary-json PATH]
"""

import sys
from pathlib import Path

from shipyard.cli import pipeline_main

CONFIG = Path(__file__).parent / "configs" / "digits.yaml"

if __name__ == "__main__":
    sys.exit(pipeline_main(CONFIG, description=__doc__))
