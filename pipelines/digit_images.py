"""Write scikit-learn's digits (bundled: no download) as a folder of 8x8 grayscale PNGs, one subfolder per class
named by its word (zero, one, ..., nine): an image folder to try `pipelines.images` on.

    python -m pipelines.digit_images .shipyard/digit-images [--copies N]

`--copies N` writes each image N times (shifted by a pixel or not, so no two files are equal): a larger folder
for benchmarks (bench/images.py).
"""

import argparse
from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digit_images(root: Path, copies: int = 1) -> int:
    """Returns the number of files written."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)  # 0-16 -> 0-255
    for word in WORDS:
        (root / word).mkdir(parents=True, exist_ok=True)
    n = 0
    for copy in range(copies):
        shifted = pixels if copy == 0 else np.roll(pixels, shift=(copy % 3) - 1, axis=2 - copy % 2)
        for i, (image, label) in enumerate(zip(shifted, digits.target)):
            Image.fromarray(image, mode="L").save(root / WORDS[label] / f"{i:04d}-{copy:03d}.png")
            n += 1
    return n


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--copies", type=int, default=1)
    args = p.parse_args()
    print(f"wrote {write_digit_images(args.root, args.copies)} PNG files under {args.root}")
