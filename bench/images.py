"""Does the image input path keep up? Shipyard's Ray Data -> Ray Train path against a plain PyTorch loop.

    python bench/images.py [--copies 12] [--epochs 4] [--model cnn] [--batch 64]

Writes scikit-learn's digits as 8x8 grayscale PNGs, `--copies` times over (pipelines/digit_images.py; the
default 12 gives 21,564 files), then trains the same model (the image task's: train-split normalization, then
model.name) at the same batch size for the same number of epochs on 1 worker, two ways:

- Shipyard: `ImageClassification.load` (Ray Data `read_images` with folder partitioning, the task's `prepare`,
  the split by path hash) and `shipyard.train.loop.make_trainer` (Ray Train, 1 worker, its checkpoint and MLflow
  report every epoch), as the pipeline runs them;
- plain PyTorch: a `torch.utils.data.DataLoader` (`num_workers=1`, shuffled) over the same training files,
  decoding each with PIL every epoch (convert, scale to [0, 1]), and the same model, loss and AdamW in a loop
  in this process (1 torch thread, as the Ray worker's 1 CPU gives it).

Steady state: the median images/s of the epochs after the first (training rows / the epoch's training loop,
including waiting for batches). Shipyard decodes every file once, in the data stage, and trains from the decoded
tensors that Ray Data holds in its object store; the one-time decode is reported apart (`load_s`) and in an
end-to-end figure over all epochs (`end_to_end_images_per_s` against the torch loop's).

Last line: one JSON object {"images_per_s", "torch_images_per_s", "ratio_vs_torch_loader", ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from shipyard import configure_process, load_config  # noqa: E402


def cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def shipyard_epochs(cfg, splits, tracking_uri: str) -> dict[str, list[float]]:
    """Fit through Ray Train as the pipeline does; the per-epoch figures come back through MLflow."""
    from mlflow import MlflowClient

    from shipyard.train.loop import make_trainer

    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment("bench-images")
    run_id = client.create_run(exp_id, run_name="ray-train").info.run_id
    trainer = make_trainer(
        cfg,
        {"train": splits.train, "val": splits.val},
        splits.info.to_dict(),
        f"bench-images-{time.time_ns()}",
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        num_workers=1,
        quiet=True,
    )
    trainer.fit()
    history = {
        k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
        for k in ("train_time_s", "epoch_time_s", "val_accuracy")
    }
    client.set_terminated(run_id)
    return history


def torch_epochs(cfg, info, files: list[Path], labels: list[int], epochs: int) -> dict[str, list[float]]:
    """The plain PyTorch loop: a DataLoader decoding the files with PIL in 1 worker process, every epoch."""
    import numpy as np
    import torch
    from PIL import Image

    from shipyard.tasks import make_task

    size, channels = cfg.data.image_size, cfg.data.channels
    mode = "L" if channels == 1 else "RGB"

    class Folder(torch.utils.data.Dataset):  # what torchvision's ImageFolder + ToTensor do, without torchvision
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            with Image.open(files[i]) as image:
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
            x = array[None] if channels == 1 else array.transpose(2, 0, 1)
            return torch.from_numpy(np.ascontiguousarray(x)), labels[i]

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    model = make_task(cfg.task, info).build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loader = torch.utils.data.DataLoader(
        Folder(), batch_size=cfg.train.batch_size, shuffle=True, num_workers=1, persistent_workers=True
    )
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return {"train_time_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=12, help="each digit written this many times (1,797 per copy)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from pipelines.digit_images import write_digit_images
    from shipyard.cluster.attach import init_ray
    from shipyard.tasks import make_task
    from shipyard.tasks.images import split_of_paths

    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-images-"))
    root = tmp / "digits"
    t0 = time.perf_counter()
    n_files = write_digit_images(root, args.copies)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs; wrote {n_files} PNG files (8x8 grayscale) under {root} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(
        ROOT / "pipelines" / "configs" / "images.yaml",
        {
            "data.path": str(root),
            "data.image_size": 8,
            "data.channels": 1,
            "model.name": args.model,
            "train.epochs": args.epochs,
            "train.batch_size": args.batch,
            "scaling.num_workers": 1,
            "tune.enabled": False,
            "serve.enabled": False,
            "storage_path": str(tmp / "results"),
            "tracking.uri": tracking_uri,
        },
    )
    import ray

    configure_process(fast_ingress=False)  # this script's start-up: Ray's settings, as a pipeline has them
    init_ray(None)
    try:
        t0 = time.perf_counter()
        task = make_task(cfg.task)
        splits = task.load(cfg.data)
        load_s = time.perf_counter() - t0
        rows = splits.rows["train"]
        print(
            f"Shipyard data stage (read_images, decode, prepare, split, normalization statistics): {load_s:.1f} s "
            f"for {n_files} files; splits {splits.rows}"
        )
        ray_hist = shipyard_epochs(cfg, splits, tracking_uri)
    finally:
        ray.shutdown()

    # the very same training files, by the same split of relative paths
    classes = splits.info.classes
    files = sorted(f for c in classes for f in (root / c).iterdir())
    relative = [str(f.relative_to(root)) for f in files]
    train = split_of_paths(relative, cfg.data.seed, cfg.data.val_fraction, cfg.data.test_fraction) == 0
    train_files = [f for f, keep in zip(files, train) if keep]
    labels = [classes.index(f.parent.name) for f in train_files]
    assert len(train_files) == rows, (len(train_files), rows)
    torch_hist = torch_epochs(cfg, splits.info, train_files, labels, args.epochs)

    ray_rates = [rows / t for t in ray_hist["train_time_s"]]
    torch_rates = [rows / t for t in torch_hist["train_time_s"]]
    print(f"\n{'epoch':>5s} {'shipyard_images_per_s':>22s} {'torch_images_per_s':>19s}")
    for e, (a, b) in enumerate(zip(ray_rates, torch_rates), 1):
        print(f"{e:5d} {a:22.0f} {b:19.0f}{'   (warm-up: excluded)' if e == 1 else ''}")
    images_per_s = statistics.median(ray_rates[1:])
    torch_images_per_s = statistics.median(torch_rates[1:])
    end_to_end = rows * args.epochs / (load_s + sum(ray_hist["train_time_s"]))
    torch_end_to_end = rows * args.epochs / sum(torch_hist["train_time_s"])
    print(
        f"\nsteady state (epochs 2-{args.epochs}, median): Shipyard {images_per_s:.0f} images/s, plain PyTorch "
        f"DataLoader (num_workers=1) {torch_images_per_s:.0f} images/s, ratio "
        f"{images_per_s / torch_images_per_s:.2f}"
    )
    print(
        f"end to end incl. Shipyard's one-time decode ({load_s:.1f} s): {end_to_end:.0f} against "
        f"{torch_end_to_end:.0f} images/s; Shipyard's last val accuracy {ray_hist['val_accuracy'][-1]:.4f}"
    )
    print(
        json.dumps(
            {
                "images_per_s": round(images_per_s, 1),
                "torch_images_per_s": round(torch_images_per_s, 1),
                "ratio_vs_torch_loader": round(images_per_s / torch_images_per_s, 3),
                "end_to_end_images_per_s": round(end_to_end, 1),
                "torch_end_to_end_images_per_s": round(torch_end_to_end, 1),
                "load_s": round(load_s, 2),
                "files": n_files,
                "train_rows": rows,
                "epochs": args.epochs,
                "model": args.model,
                "batch": args.batch,
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
