"""`shipyard plan` and the pipeline's plan checks as a user runs them: each in its own Python process (seconds),
without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard import load_config, make_plan
from tests.helpers import hand_made_profile as _profile

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "pipelines" / "configs" / "digits.yaml")


NO_RAY = (
    "import sys; from shipyard.cli import main; rc = main(sys.argv[1:]); "
    "assert 'ray' not in sys.modules, 'plan imported ray'; sys.exit(rc)"
)


def shipyard(*args):
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )


def test_plan_on_catalog_hardware_prints_tables_and_a_plot_without_ray(tmp_path):
    out = shipyard("plan", DIGITS, "--hardware", "h100", "--nodes", "1..8", "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in (
        "top layers by time",
        "predicted step time",
        "strong scaling",
        "weak scaling",
        "recommended:",
        "search: 4 trials, asha",
        "nvlink4",
        "ib-200",
    ):
        assert needle in text
    table = text.split("strong scaling")[1].split("weak scaling")[0]
    workers = [int(line.split()[0]) for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert workers == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_errors_name_the_fix(tmp_path):
    out = shipyard("plan", DIGITS, "--profile", str(tmp_path / "none.json"), "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 2 and "run `shipyard calibrate`" in out.stderr
    out = shipyard("plan", DIGITS, "--hardware", "tpu", "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 2 and "known: a100, h100, h200" in out.stderr
    out = shipyard("plan", DIGITS, "--hardware", "h100", "--nodes", "8..x", "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 2 and "--nodes '8..x'" in out.stderr


def test_unknown_plan_hardware_fails_before_ray_starts():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.digits", "plan.hardware=tpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "plan.hardware 'tpu' is unknown" in out.stderr
    assert "starting or attaching to Ray" not in out.stderr


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    from pipelines.digit_images import write_digit_images

    root = tmp_path_factory.mktemp("digit-pngs")
    write_digit_images(root)
    return root


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_plan_prices_the_image_task_locally_and_on_catalog_hardware(tmp_path, digit_pngs, model):
    """The image task's own step (its encoder, the [C, H, W] net, cross-entropy), from the folder's file count."""
    images = ROOT / "pipelines" / "configs" / "images.yaml"
    cfg = load_config(
        images, {"data.path": str(digit_pngs), "data.image_size": 8, "data.channels": 1, "model.name": model}
    )
    plan = make_plan(cfg, "local", profile=_profile(tmp_path))
    assert plan.shape.rows == 1797 and plan.shape.num_classes == 10
    assert plan.step.top_layers(1)[0].kind == "Conv2d" and plan.step.step_time_ms > 0
    out = shipyard(
        "plan",
        str(images),
        f"data.path={digit_pngs}",
        "data.image_size=8",
        "data.channels=1",
        f"model.name={model}",
        "--hardware",
        "h100",
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert out.returncode == 0, out.stderr
    assert f"model {model} (" in out.stdout and "predicted step time" in out.stdout and "nvlink4" in out.stdout
    assert "1258 training rows" in out.stdout  # 1,797 files, the default 0.7 train fraction


def test_plan_measure_times_the_real_step_here_and_prices_other_hardware_from_it(tmp_path):
    """--measure: the real digits MLP runs a few steps in this process (no Ray); the plan says so, prints its
    uncertainty, and a catalog GPU is priced from the same measurement (this machine's profile scales it)."""
    profile = str(_profile(tmp_path))
    out = shipyard("plan", DIGITS, "--measure", "--profile", profile, "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    note = next(line for line in out.stdout.splitlines() if "measured mode" in line)
    assert "the real step ran here at 32 rows with 1 thread(s)" in note and "counted ops matched" in note
    assert " ± " in out.stdout.split("predicted step time")[1].split("\n")[0]
    assert "USDT" not in out.stderr  # the profiler's start/stop lines are held back
    if len(os.sched_getaffinity(0)) >= 2:  # digits trains on 2 workers: the model's own DDP step is measured too
        ddp = next(line for line in out.stdout.splitlines() if "DDP step on 2 local gloo peers" in line)
        slowdown = float(ddp.split("= ")[1].split(" x")[0])
        assert slowdown >= 1.0 and "2 workers on this node are priced from it" in ddp
    gpu = shipyard(
        "plan", DIGITS, "--measure", "--hardware", "h100", "--profile", profile, "--plot", str(tmp_path / "g.png")
    )
    assert gpu.returncode == 0, gpu.stderr
    assert "measured mode" in gpu.stdout and "nvlink4" in gpu.stdout
    assert "local gloo peers" not in gpu.stdout  # a GPU's data parallelism is not this machine's
    missing = shipyard("plan", DIGITS, "--measure", "--hardware", "h100", "--profile", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "run `shipyard calibrate`" in missing.stderr
