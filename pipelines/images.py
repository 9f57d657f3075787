"""The image pipeline: a folder of class subfolders of PNG/JPEG files to a live endpoint that takes images.

    python -m pipelines.images data.path=my-images [key=value ...]

The registered model is named after the folder (images-<folder>) unless tracking.model_name is set.
"""

import sys
from pathlib import Path

from shipyard.cli import pipeline_main

CONFIG = Path(__file__).parent / "configs" / "images.yaml"

if __name__ == "__main__":
    sys.exit(pipeline_main(CONFIG, description=__doc__))
