"""The performance model on one CUDA GPU: predicted vs measured step time, torch alone (no Ray, MLflow, network).

    bash bench/gpu_check.sh                     # on a machine with one NVIDIA GPU (sized for < 8 min on an H100)
    python bench/gpu_check.py --device cpu      # dry run of the same script on this machine's CPU

For each model (MLP, CNN, transformer encoder; the built-ins at their default size on 64 features, 10
classes) and batch size, the training step Shipyard runs (shipyard.train.step.training_step: AdamW, fp32,
PyTorch's default multi-tensor AdamW on CUDA) is timed on random data already on the device: the median of
50 steps after 10 warm-up steps, each synchronised. The prediction prices the same step counted on the meta
device with the catalog entry of the GPU's data sheet (shipyard.perf.devices) and, second, with the per-op
overhead measured here (a tiny model's step / its ops), the one figure a data sheet does not give.

Writes gpu_check.txt and gpu_check.json to --out (default $OUT, else .shipyard/gpu_check); the last line
printed is the JSON object {"device", "cases", "median_rel_err", "max_rel_err", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402
from torch.nn.functional import cross_entropy  # noqa: E402

from shipyard.perf.devices import DEVICES, Device  # noqa: E402
from shipyard.perf.estimate import estimate_step  # noqa: E402
from shipyard.perf.layers import count_step_work  # noqa: E402
from shipyard.tasks.models import cnn, mlp, transformer  # noqa: E402
from shipyard.train.step import training_step  # noqa: E402

MODELS = {"mlp": lambda: mlp(64, 10), "cnn": lambda: cnn(64, 10), "transformer": lambda: transformer(64, 10)}
IN_FEATURES = 64


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_step_ms(
    build, batch: int, device: str, in_features: int = IN_FEATURES, classes: int = 10, warmup: int = 10, steps: int = 50
) -> float:
    torch.manual_seed(0)
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # PyTorch's default implementation for the device
    x = torch.randn(batch, in_features, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    for _ in range(warmup):
        training_step(model, opt, {"x": x, "y": y}, cross_entropy)  # loss.item() synchronises, as in Shipyard's loop
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        training_step(model, opt, {"x": x, "y": y}, cross_entropy)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def overhead_us(device: str) -> float:
    """Per-op time of a training step too small for any op to do real work (as shipyard calibrate measures)."""
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2)
        )

    ms = measure_step_ms(build, 2, device, in_features=4, classes=2)
    ops = len(count_step_work(build, 2, 4, 2, foreach=device == "cuda").ops)
    return ms * 1e3 / ops


def catalog_device(name: str) -> Device:
    for key in ("h200", "h100", "a100"):  # "NVIDIA H100 80GB HBM3" -> h100
        if key in name.lower():
            return DEVICES[key]
    raise SystemExit(f"no catalog entry for '{name}': known {', '.join(DEVICES)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batches", default="64,1024,8192")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / ".shipyard" / "gpu_check"))
    args = p.parse_args()
    started = time.perf_counter()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    if args.device == "cuda":
        # fp32 as priced: cuDNN convolutions would otherwise run in TF32 (torch.backends.cudnn.allow_tf32 is on
        # by default; matmuls are fp32 by default)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
        name = torch.cuda.get_device_name(0)
        catalog = catalog_device(name)
        if any(k in name.lower() for k in ("pcie", "nvl")):
            say(
                f"note: {name} is priced with the SXM data sheet's figures ({catalog.source}); PCIe/NVL cards have "
                "lower clocks and bandwidth"
            )
    else:  # dry run: this CPU, measured as shipyard calibrate does
        from shipyard.perf.probes import measure_device

        name = "cpu (dry run)"
        torch.set_num_threads(1)
        catalog = measure_device(1, budget_s=0.05)
    measured_overhead = overhead_us(args.device)
    tuned = replace(catalog, op_overhead_us=measured_overhead)
    say(
        f"device: {name}; torch {torch.__version__}; catalog {catalog.name} ({catalog.source}): "
        f"fp32 {catalog.peak_tflops['fp32']} TFLOP/s x {catalog.matmul_fraction}, {catalog.mem_bandwidth_gbps} GB/s x "
        f"{catalog.elementwise_fraction}, {catalog.op_overhead_us} us/op; measured {measured_overhead:.2f} us/op"
    )
    say(
        f"{'model':12s} {'batch':>6s} {'measured_ms':>11s} {'catalog_ms':>10s} {'err':>7s} {'+overhead_ms':>12s} "
        f"{'err':>7s}"
    )
    cases = []
    for model, build in MODELS.items():
        for batch in map(int, args.batches.split(",")):
            work = count_step_work(build, batch, IN_FEATURES, 10, foreach=args.device == "cuda")
            measured = measure_step_ms(build, batch, args.device)
            pred = estimate_step(work, catalog).step_time_ms
            pred_tuned = estimate_step(work, tuned).step_time_ms
            case = {
                "model": model,
                "batch": batch,
                "measured_ms": measured,
                "catalog_ms": pred,
                "catalog_rel_err": (pred - measured) / measured,
                "tuned_ms": pred_tuned,
                "rel_err": (pred_tuned - measured) / measured,
                "ops": len(work.ops),
                "gflop": work.flops / 1e9,
            }
            cases.append(case)
            say(
                f"{model:12s} {batch:6d} {measured:11.3f} {pred:10.3f} {case['catalog_rel_err']:+7.1%} "
                f"{pred_tuned:12.3f} {case['rel_err']:+7.1%}"
            )
    errs = [abs(c["rel_err"]) for c in cases]
    cat_errs = [abs(c["catalog_rel_err"]) for c in cases]
    summary = {
        "device": name,
        "cases": len(cases),
        "median_rel_err": round(statistics.median(errs), 4),
        "max_rel_err": round(max(errs), 4),
        "catalog_median_rel_err": round(statistics.median(cat_errs), 4),
        "catalog_max_rel_err": round(max(cat_errs), 4),
        "measured_op_overhead_us": round(measured_overhead, 3),
        "seconds": round(time.perf_counter() - started, 1),
        "per_case": [{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items()} for c in cases],
    }
    say(
        f"{len(cases)} cases in {summary['seconds']} s: with the measured per-op overhead median |rel err| "
        f"{summary['median_rel_err']:.1%}, worst {summary['max_rel_err']:.1%}; data sheet alone median "
        f"{summary['catalog_median_rel_err']:.1%}, worst {summary['catalog_max_rel_err']:.1%}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
