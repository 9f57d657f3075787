"""Image classification from a folder of class subfolders (torchvision's ImageFolder convention):

    root/<class name>/*.png|jpg     python -m pipelines.images data.path=root data.image_size=32 data.channels=3

Files are read with Ray Data's `read_images` (class from the folder, by `Partitioning("dir")`) and split by a
hash of each file's path relative to the root and `data.seed`, so the same folder gives the same split anywhere.
`prepare` turns a decoded image into the model's `[C, H, W]` float input (resize to data.image_size with PIL's
bilinear filter, scale to [0, 1]); the endpoint decodes a base64 PNG/JPEG (`{"b64": ...}`, TF Serving's
convention for binary values) or takes pixel arrays, and calls the same `prepare`. The per-channel mean and
deviation of the train split normalize inside the model (`ImageEncoder`), which also applies the optional
train-only augmentation (`data.augment_crop_pad`, `data.augment_flip`): the exported model never augments.
A file that does not decode stops the run with one error naming it; `data.skip_bad_files=true` skips and counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shipyard.errors import DataError
from shipyard.tasks.base import DataInfo, RequestError, Splits, Task

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_REQUEST_PIXELS = 4096 * 4096
"""An image in a request may decode to at most this many pixels: a few KiB of PNG can unpack to hundreds of
megapixels (PIL only warns below twice its own MAX_IMAGE_PIXELS), which a replica would hold in memory."""


def mode_of(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def prepare(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """A decoded image (H x W or H x W x C, 0-255) as the model's input: `[channels, size, size]` float32 in
    [0, 1], resized with PIL's bilinear filter. Training (after Ray Data decodes a file) and the endpoint (after
    it decodes a request) both call this: the same pixels give the same tensor."""
    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode_of(channels))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def decode(data: bytes, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes as pixels (H x W or H x W x 3), decoded and converted by PIL as Ray Data's read does.
    `max_pixels`: refuse a larger image (RequestError) from its header, before its pixels are decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise RequestError(f"image of {image.width} x {image.height} pixels; the limit is {max_pixels:,} pixels")
        return np.asarray(image.convert(mode_of(channels)))


def bad_images(files: list[Path], channels: int) -> list[tuple[Path, str]]:
    """The files PIL cannot decode, each with PIL's reason."""
    out = []
    for f in files:
        try:
            decode(f.read_bytes(), channels)
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, ...)
            out.append((f, f"{type(err).__name__}: {err}"[:200]))
    return out


def split_of_paths(relative: list[str], seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = val, 2 = test per file, from a hash of its path relative to the root and the seed."""
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{r}".encode()).digest()[:8], "big") / 2**64 for r in relative])
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))


class ImageEncoder(nn.Module):
    """Per-channel normalization by the train split's statistics; in training mode first a random crop (pad by
    `crop_pad`, cut back at a random offset per image) and a random horizontal flip, when configured."""

    def __init__(self, mean: list[float], std: list[float], crop_pad: int = 0, flip: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.crop_pad, self.flip = crop_pad, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.crop_pad > 0:
            n, c, h, w = x.shape
            p = self.crop_pad
            padded = nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), device=x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), device=x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = padded[
                torch.arange(n, device=x.device)[:, None, None, None],
                torch.arange(c, device=x.device)[None, :, None, None],
                rows,
                cols,
            ]
        if self.training and self.flip:
            mask = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return (x - self.mean) / self.std


class ImageClassification(Task):
    METRICS = {"accuracy": "max"}

    def _root(self, cfg) -> Path:
        if cfg.path is None:
            raise DataError(
                "task.name=image_classification reads data.path=<folder of class subfolders>; "
                "data.builtin is for tables"
            )
        return Path(cfg.path).expanduser().resolve()

    def folder(self, cfg) -> tuple[Path, list[str], list[Path]]:
        """The root, its class names (subfolders holding images, sorted) and every image file."""
        root = self._root(cfg)
        if not root.is_dir():
            raise DataError(
                f"data.path: {root} is not a folder; image_classification reads root/<class>/*.png (or .jpg)"
            )
        classes, files = [], []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            found = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
            if found:
                classes.append(d.name)
                files += found
        if len(classes) < 2:
            raise DataError(
                f"data.path: {root} has {len(classes)} class subfolder(s) with .png/.jpg files "
                f"({', '.join(classes) or 'none'}); image_classification needs at least 2: "
                "root/<class name>/<image files>"
            )
        return root, classes, files

    def check_source(self, cfg) -> None:
        self.folder(cfg)

    def load(self, cfg) -> Splits:
        import ray.data
        from ray.data.datasource import Partitioning

        from shipyard.data.ray_errors import clear_errors, find_cause

        root, classes, files = self.folder(cfg)
        size, channels = cfg.image_size, cfg.channels
        skipped: list[tuple[Path, str]] = []
        if cfg.skip_bad_files:
            skipped = bad_images(files, channels)
            if skipped:
                log.warning(
                    "data: skipping %d file(s) that do not decode (data.skip_bad_files), e.g. %s (%s)",
                    len(skipped),
                    skipped[0][0],
                    skipped[0][1],
                )
                bad = {f for f, _ in skipped}
                files = [f for f in files if f not in bad]
        index = {c: i for i, c in enumerate(classes)}
        seed, val_f, test_f = cfg.seed, cfg.val_fraction, cfg.test_fraction

        def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            relative = [str(Path(p).relative_to(root)) if Path(p).is_absolute() else p for p in batch["path"]]
            return {
                "x": np.stack([prepare(img, size, channels) for img in batch["image"]]),
                "y": np.array([index[c] for c in batch["label"]], dtype=np.int64),
                "split": split_of_paths(relative, seed, val_f, test_f),
            }

        try:
            with clear_errors(f"{root}: could not read the images"):
                ds = ray.data.read_images(
                    [str(f) for f in files],
                    mode=mode_of(channels),
                    include_paths=True,
                    partitioning=Partitioning("dir", base_dir=str(root), field_names=["label"]),
                )
                # the files' order, not the order their parallel reads finish in: the same folder and seed give
                # the same rows in the same order, hence the same model (this dataset's own context: nothing
                # process-wide changes)
                ds.context.execution_options.preserve_order = True
                encoded = ds.map_batches(encode, batch_format="numpy").materialize()
        except DataError as err:
            bad = bad_images(files, channels)  # name the file: Ray Data's error names a read task, not a file
            if bad:
                raise DataError(
                    f"data.path: {bad[0][0]} is not a decodable image ({bad[0][1]}); {len(bad)} such "
                    f"file(s) under {root}. Fix or delete them, or set data.skip_bad_files=true to "
                    "skip them (counted in the log)"
                ) from None
            raise err from find_cause(err, Exception)
        parts = {
            name: encoded.filter(expr=f"split == {i}").drop_columns(["split"]).materialize()
            for i, name in enumerate(("train", "val", "test"))
        }
        rows = {name: part.count() for name, part in parts.items()}
        if min(rows.values()) == 0:
            raise DataError(f"{root}: too few images ({sum(rows.values())}) for a train/val/test split {rows}")
        mean, std = _channel_stats(parts["train"], channels)
        digest = hashlib.sha256()
        for f in files:
            digest.update(str(f.relative_to(root)).encode())
            digest.update(f.read_bytes())
        info = DataInfo(
            task=self.name,
            input_shape=[channels, size, size],
            output_width=len(classes),
            target="class folder",
            feature_names=[],
            classes=classes,
            data_hash=digest.hexdigest(),
            rows=rows,
            preprocessing={
                "mean": mean,
                "std": std,
                "image_size": size,
                "channels": channels,
                "augment_crop_pad": cfg.augment_crop_pad,
                "augment_flip": cfg.augment_flip,
                "skipped_files": len(skipped),
            },
        )
        log.info(
            "data %s: %d images of %d classes (%s), [%d, %d, %d], rows %s%s",
            root,
            sum(rows.values()),
            len(classes),
            ", ".join(classes[:10]),
            channels,
            size,
            size,
            rows,
            f", {len(skipped)} bad file(s) skipped" if skipped else "",
        )
        self.bind(info)
        return Splits(parts["train"], parts["val"], parts["test"], info)

    # -- the model -------------------------------------------------------------------------------------
    def net_shape(self) -> tuple[Any, int]:
        return tuple(self.info.input_shape), self.info.output_width

    def encoder(self) -> ImageEncoder:
        p = self.info.preprocessing
        return ImageEncoder(p["mean"], p["std"], p.get("augment_crop_pad", 0), p.get("augment_flip", False))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {
            "loss": nn.functional.cross_entropy(outputs.float(), targets).item(),
            "accuracy": (outputs.argmax(1) == targets).float().mean().item(),
        }

    # -- serving ---------------------------------------------------------------------------------------
    def parse_instances(self, instances: list[Any]) -> np.ndarray:
        size, channels = self.info.input_shape[1], self.info.input_shape[0]
        out = np.empty((len(instances), channels, size, size), dtype=np.float32)
        for i, item in enumerate(instances):
            if isinstance(item, dict):
                if set(item) != {"b64"} or not isinstance(item["b64"], str):
                    raise RequestError(f'instances[{i}]: give {{"b64": "<base64 PNG or JPEG>"}} or an array of pixels')
                try:
                    pixels = decode(base64.b64decode(item["b64"], validate=True), channels, MAX_REQUEST_PIXELS)
                except RequestError as err:
                    raise RequestError(f"instances[{i}].b64: {err}") from None
                except (binascii.Error, ValueError) as err:
                    raise RequestError(f"instances[{i}].b64 is not base64: {err}") from None
                except Exception as err:  # noqa: BLE001 - PIL's many kinds of "not an image"
                    raise RequestError(
                        f"instances[{i}].b64 is not a PNG or JPEG image PIL can decode ({type(err).__name__})"
                    ) from None
            else:
                try:
                    pixels = np.asarray(item, dtype=np.float64)
                except (ValueError, TypeError):
                    raise RequestError(f"instances[{i}]: pixel rows of unequal length or not numbers") from None
                if (
                    pixels.ndim not in (2, 3)
                    or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3))
                    or not pixels.size
                    or not np.isfinite(pixels).all()
                    or pixels.min() < 0
                    or pixels.max() > 255
                ):
                    raise RequestError(
                        f"instances[{i}]: pixels must be an H x W or H x W x 3 array of numbers in "
                        f"0-255 (got shape {list(pixels.shape)})"
                    )
                pixels = np.rint(pixels)
            out[i] = prepare(pixels, size, channels)
        return out

    def instances(self, x: np.ndarray) -> list[Any]:
        """The test images as pixel arrays (H x W, or H x W x 3), 0-255: what the model was trained on."""
        pixels = np.rint(x * 255).astype(np.uint8)
        return [(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)).tolist() for p in pixels]

    def inputs(self) -> list[dict[str, Any]]:
        c, h, w = self.info.input_shape
        return [
            {
                "name": "image",
                "kind": "image",
                "channels": c,
                "size": [h, w],
                "accepts": ['{"b64": "<base64 PNG or JPEG>"}', "pixels: H x W (x 3) numbers in 0-255"],
            }
        ]


def _channel_stats(train, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and deviation of the train split's pixels (in [0, 1]), from per-block sums."""

    def sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["x"].astype(np.float64)
        return {
            "s": x.sum(axis=(0, 2, 3))[None],
            "ss": (x**2).sum(axis=(0, 2, 3))[None],
            "n": np.array([x.shape[0] * x.shape[2] * x.shape[3]]),
        }

    parts = train.map_batches(sums, batch_format="numpy").take_all()
    n = sum(int(p["n"]) for p in parts)
    s = np.sum([p["s"] for p in parts], axis=0)
    ss = np.sum([p["ss"] for p in parts], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0))
    return mean.tolist(), [float(v) if v > 1e-6 else 1.0 for v in std]
