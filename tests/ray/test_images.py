"""Image folders end to end: the digits set as PNG class folders named by words, trained and served; training's
and serving's decoding give identical tensors; an undecodable file stops the run with one error naming it."""

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests

from pipelines.digit_images import WORDS, write_digit_images
from shipyard import DataError, load_config
from shipyard.cli import run_pipeline
from shipyard.data.tables import to_numpy
from shipyard.tasks import make_task
from shipyard.tasks.images import decode, prepare
from tests.helpers import report, shutdown_serve

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "pipelines" / "configs" / "images.yaml"
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digit-pngs")
    assert write_digit_images(root) == 1797
    return root


def test_digit_pngs_train_to_95_percent_and_the_endpoint_names_the_class_of_a_base64_png(
    ray_local, workdir, digit_pngs, serve_port
):
    settings = {
        **workdir,
        "data.path": digit_pngs,
        "data.image_size": 8,
        "data.channels": 1,
        "tune.enabled": False,
        "train.epochs": 10,
        "serve.port": serve_port,
    }
    summary = run_pipeline(IMAGES, [f"{k}={v}" for k, v in settings.items()], keep_serving=True)
    try:
        report(f"digit PNGs: test accuracy {summary['test_accuracy']:.4f}, endpoint {summary['endpoint_accuracy']:.4f}")
        assert summary["test_metric_name"] == "accuracy" and summary["test_accuracy"] >= 0.95
        assert summary["endpoint_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
        assert all(a in WORDS for a in summary["endpoint_example"]["response"]["predictions"])
        url = summary["endpoint"]
        files = {w: sorted((digit_pngs / w).glob("*.png"))[:3] for w in ("three", "seven")}
        body = {"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for fs in files.values() for f in fs]}
        answer = requests.post(f"{url}/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        predicted = answer.json()["predictions"]
        assert sum(p == w for p, w in zip(predicted, ["three"] * 3 + ["seven"] * 3)) >= 5, predicted
        meta = requests.get(f"{url}/metadata", timeout=30).json()
        assert meta["classes"] == sorted(WORDS), meta
        bad = requests.post(
            f"{url}/predict", json={"instances": [{"b64": base64.b64encode(b"GIF89a").decode()}]}, timeout=30
        )
        assert bad.status_code == 422 and "instances[0].b64 is not a PNG or JPEG image" in bad.text
        assert requests.post(f"{url}/predict", json=body, timeout=30).status_code == 200  # still up
    finally:
        shutdown_serve()


def test_the_same_folder_loads_into_the_same_rows_in_the_same_order(ray_local, digit_pngs):
    """The images are read in parallel; the splits keep the files' order, not the order the reads finish in, so
    a run with the same seed trains on the same batches (the test above held 0.9722 twice in a row with this;
    without it, 0.9484 to 0.9762 from run to run on the same commit)."""
    cfg = load_config(IMAGES, {"data.path": str(digit_pngs), "data.image_size": 8, "data.channels": 1})
    first, second = (make_task(cfg.task).load(cfg.data) for _ in range(2))
    for name in ("train", "val", "test"):
        (x1, y1), (x2, y2) = to_numpy(getattr(first, name)), to_numpy(getattr(second, name))
        assert np.array_equal(y1, y2) and np.array_equal(x1, x2), f"{name}: another order on the second read"


def test_training_and_serving_decode_a_file_to_identical_tensors(ray_local, tmp_path):
    """Odd sizes, RGB and grayscale sources, PNG and JPEG: Ray Data's read path (read_images, then the task's
    prepare) and the endpoint's (base64 -> decode -> prepare, or pixel arrays) agree bit for bit."""
    from PIL import Image

    rng = np.random.default_rng(1)
    files = []
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i, (size, mode, fmt) in enumerate(
            [((13, 9), "RGB", "PNG"), ((7, 11), "L", "PNG"), ((16, 16), "RGB", "JPEG"), ((5, 5), "L", "JPEG")] * 3
        ):
            shape = size[::-1] + ((3,) if mode == "RGB" else ())
            f = tmp_path / cls / f"{i}.{fmt.lower()}"
            Image.fromarray(rng.integers(0, 256, size=shape).astype(np.uint8), mode).save(f, fmt)
            files.append(f)
    cfg = load_config(
        IMAGES,
        {
            "data.path": str(tmp_path),
            "data.image_size": 6,
            "data.channels": 3,
            "data.val_fraction": 0.3,
            "data.test_fraction": 0.3,
        },
    )
    task = make_task(cfg.task)
    splits = task.load(cfg.data)
    trained_on = np.concatenate([to_numpy(s)[0] for s in (splits.train, splits.val, splits.test)])
    assert trained_on.shape == (len(files), 3, 6, 6)
    served = task.parse_instances([{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files])
    pixels = task.parse_instances([decode(f.read_bytes(), 3).tolist() for f in files])
    assert np.array_equal(served, pixels)
    for f, row in zip(files, served):
        assert np.array_equal(row, prepare(decode(f.read_bytes(), 3), 6, 3))
        assert any(np.array_equal(row, t) for t in trained_on), f"{f}: served tensor not among the trained ones"


def test_an_undecodable_file_stops_the_run_naming_it_unless_bad_files_are_skipped(ray_local, digit_pngs, tmp_path):
    root = tmp_path / "pngs"
    shutil.copytree(digit_pngs, root)
    (root / "three" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    overrides = {"data.path": str(root), "data.image_size": 8, "data.channels": 1}
    cfg = load_config(IMAGES, overrides)
    with pytest.raises(DataError) as err:
        make_task(cfg.task).load(cfg.data)
    message = str(err.value)
    print(message)
    assert f"{root / 'three' / 'broken.png'} is not a decodable image" in message
    assert "1 such file(s)" in message and "data.skip_bad_files=true" in message and "\n" not in message
    cfg = load_config(IMAGES, {**overrides, "data.skip_bad_files": True})
    splits = make_task(cfg.task).load(cfg.data)
    assert splits.info.preprocessing["skipped_files"] == 1 and sum(splits.info.rows.values()) == 1797


def test_a_folder_with_one_class_or_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    Image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
    (tmp_path / "only" / "a.png").write_bytes(buf.getvalue())
    cfg = load_config(IMAGES, {"data.path": str(tmp_path)})
    with pytest.raises(DataError, match=r"has 1 class subfolder\(s\) with .png/.jpg files \(only\); .*at least 2"):
        make_task(cfg.task).check_source(cfg.data)
    cfg = load_config(IMAGES, {"data.path": str(tmp_path / "only" / "a.png")})
    with pytest.raises(DataError, match="is not a folder"):
        make_task(cfg.task).check_source(cfg.data)


def test_a_request_image_over_the_pixel_limit_is_refused_from_its_header():
    """A 5000 x 5000 PNG of zeros is ~25 KiB: under the body limit, but 25 megapixels once decoded."""
    from PIL import Image

    from shipyard import RequestError
    from shipyard.tasks import task_of

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    task = task_of(
        {
            "task": "image_classification",
            "input_shape": [1, 8, 8],
            "output_width": 2,
            "target": "class folder",
            "classes": ["a", "b"],
        }
    )
    with pytest.raises(RequestError, match=r"instances\[0\].b64: image of 5000 x 5000 pixels; the limit is 16,777,216"):
        task.parse_instances([{"b64": base64.b64encode(buf.getvalue()).decode()}])
