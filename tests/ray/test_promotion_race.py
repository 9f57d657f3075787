"""Pipelines promoting at the same moment into one `mlflow server`: the alias ends on the best version, every time.

Four versions of `race` of known accuracy on sklearn digits; one Python process per version calls
`tracking.promote_if_better` at a shared start time, for a few rounds with the alias reset in between. The
protocol itself (tracking -> shipyard.track.promotion.steps) is checked under adversarial interleavings in
tests/unit/test_promotion.py; this checks it on the real registry, through real processes.

The worker side runs as `python tests/ray/test_promotion_race.py <tracking uri> <version> <folder>`.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
NAME = "race"

# (champion before the round or None, versions racing): the best of them must hold the alias after the round
ROUNDS = [("1", ["2", "3", "4"]), (None, ["2", "3", "4"]), ("3", ["2", "4"]), ("2", ["3", "4"])]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order[400:]], y[order[400:]], x[order[:400]], y[order[:400]]


def _train(seed: int, steps: int, x, y):
    import torch

    from shipyard.tasks.models import mlp

    torch.manual_seed(seed)
    model = mlp(64, 10, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):  # a step is a full batch: v1 untrained, the others trained a little or a lot
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def race(mlflow_server, tmp_path_factory):
    """Versions 1-4 of `race` on the server and their test accuracies; one worker process per racing version,
    started first (their imports overlap the registration), each given its accuracy once the models exist."""
    import mlflow
    import torch

    from shipyard import load_config
    from shipyard.track import runs as tracking

    x, y, x_test, y_test = _digits()
    folder = tmp_path_factory.mktemp("race")
    np.savez(folder / "test.npz", x=x_test, y=y_test)
    workers = {v: _start_worker(mlflow_server, v, folder) for v in ("2", "3", "4")}
    try:
        cfg = load_config(None, {"tracking.uri": mlflow_server, "name": NAME})
        tracking.setup(cfg)
        accuracy, threads = {}, torch.get_num_threads()
        torch.set_num_threads(1)  # a few hundred small steps: threads only contend on 2 shared cores
        with mlflow.start_run(run_name="race-models"):
            for seed, steps in ((0, 0), (1, 5), (2, 60), (3, 15)):
                model = _train(seed, steps, x, y)
                with torch.no_grad():
                    acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
                version = tracking.log_model(
                    model,
                    x_test[:5],
                    cfg,
                    list(range(10)),
                    [f"p{i}" for i in range(64)],
                    {"shipyard.data_hash": "digits", "shipyard.split": "race"},
                )
                accuracy[version] = acc
        torch.set_num_threads(threads)
        _publish(folder / "accuracy.json", accuracy)
        yield mlflow_server, accuracy, folder, workers
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def _start_worker(uri: str, version: str, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    with open(folder / f"worker-{version}.log", "w") as out:
        return subprocess.Popen(
            [sys.executable, __file__, uri, version, str(folder)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _publish(path: Path, obj) -> None:
    """Write whole or not at all: the other side polls for the file."""
    path.with_suffix(".tmp").write_text(json.dumps(obj))
    path.with_suffix(".tmp").rename(path)


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _reset(client, champion: str | None) -> list[str]:
    """The alias on `champion` (or none), a history of just that, no promotion tags: the state before a round."""
    from shipyard.track.registry import CHAMPION, CLAIM_TAG, HISTORY_TAG, PROMOTION_TAG

    for v in ("1", "2", "3", "4"):
        for key in (PROMOTION_TAG, CLAIM_TAG):
            client.delete_model_version_tag(NAME, v, key)
    history = [champion] if champion else []
    if champion:
        client.set_registered_model_alias(NAME, CHAMPION, champion)
    else:
        client.delete_registered_model_alias(NAME, CHAMPION)
    client.set_registered_model_tag(NAME, HISTORY_TAG, json.dumps(history))
    return history


def test_concurrent_promotions_leave_the_best_version_champion_every_round(race):
    from shipyard.track.registry import CLAIM_TAG, HISTORY_TAG, PROMOTION_TAG

    uri, accuracy, folder, workers = race
    assert list(accuracy) == ["1", "2", "3", "4"]
    assert accuracy["1"] < accuracy["2"] < accuracy["4"] < accuracy["3"], accuracy  # distinct, best is v3
    client = _client(uri)
    for n, (champion, racing) in enumerate(ROUNDS):
        history = _reset(client, champion)
        # a shared start a little ahead: the workers have imported everything and poll for it
        _publish(folder / f"go-{n}.json", {"at": time.time() + 0.5, "racing": racing})
        deadline = time.monotonic() + 90
        while not all((folder / f"done-{n}-{v}.json").exists() for v in racing):
            assert time.monotonic() < deadline, _logs(folder, workers)
            assert all(p.poll() is None for p in workers.values()), _logs(folder, workers)
            time.sleep(0.1)
        print(f"round {n}: {time.monotonic() - deadline + 90:.1f} s")  # shown when the test fails
        done = {v: json.loads((folder / f"done-{n}-{v}.json").read_text()) for v in racing}

        best = max([*racing, *([champion] if champion else [])], key=accuracy.get)
        model = client.get_registered_model(NAME)
        where = f"round {n} (champion v{champion}, racing {racing}): {done}"
        assert str(model.aliases["champion"]) == best, where
        recorded = json.loads(model.tags[HISTORY_TAG])
        assert recorded[: len(history)] == history and recorded[-1] == best, (recorded, where)
        for v in ("1", "2", "3", "4"):
            tags = client.get_model_version(NAME, v).tags
            assert tags.get(PROMOTION_TAG) != "pending" and CLAIM_TAG not in tags, (v, tags, where)
        # the best racer's promoter says it promoted; when the champion is the best already, the alias never
        # moves, not even for a moment (every write beats a champion its writer read), and nobody is promoted
        if best in racing:
            assert done[best]["promote"], where
        else:
            assert recorded == history and not any(d["promote"] for d in done.values()), where
            assert all("does not beat" in d["reason"] for d in done.values()), where
    _publish(folder / f"go-{len(ROUNDS)}.json", {"stop": True})
    for p in workers.values():
        assert p.wait(timeout=30) == 0, _logs(folder, workers)


def _logs(folder, workers) -> str:
    return "\n".join(
        f"--- worker v{v} (exit {p.poll()}):\n{(folder / f'worker-{v}.log').read_text()[-3000:]}"
        for v, p in workers.items()
    )


def worker(uri: str, version: str, folder: Path) -> None:
    """One pipeline's promotion step, once per round: waits for the round's start time, then promotes."""
    import logging

    import mlflow

    from shipyard.tasks import task_of
    from shipyard.track import runs as tracking

    logging.basicConfig(level=logging.INFO, format="%(asctime)s v" + version + " %(name)s: %(message)s")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    rows = np.load(folder / "test.npz")
    x_test, y_test = rows["x"], rows["y"]

    def wait_for(path: Path) -> dict:  # the test died if it takes this long: do not outlive it
        deadline = time.monotonic() + 600
        while not path.exists():
            if time.monotonic() > deadline:
                sys.exit(f"gave up waiting for {path}")
            time.sleep(0.02)
        return json.loads(path.read_text())

    accuracy = wait_for(folder / "accuracy.json")[version]
    classify = task_of(
        {
            "task": "classification",
            "input_shape": [64],
            "output_width": 10,
            "target": "label",
            "classes": list(range(10)),
        }
    )
    for n in range(len(ROUNDS) + 1):
        go = wait_for(folder / f"go-{n}.json")
        if go.get("stop"):
            return
        if version not in go["racing"]:
            continue
        time.sleep(max(0.0, go["at"] - time.time()))
        decision, champion_acc = tracking.promote_if_better(NAME, version, accuracy, x_test, y_test, classify)
        _publish(
            folder / f"done-{n}-{version}.json",
            {"promote": decision.promote, "reason": decision.reason, "champion_accuracy": champion_acc},
        )


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
