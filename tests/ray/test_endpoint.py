"""The Serve endpoint on a registered model: answers, versions, and 4xx on malformed bodies."""

import json
import time

import mlflow
import numpy as np
import pytest
import requests
import torch

from shipyard import build_app, load_config
from shipyard.serve.ingress import wait_until_routed
from shipyard.tasks.models import mlp
from shipyard.track import runs as tracking
from tests.helpers import free_port, shutdown_serve

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def endpoint(ray_local, tmp_path_factory):
    from ray import serve

    d = tmp_path_factory.mktemp("endpoint")
    cfg = load_config(None, {"tracking.uri": f"sqlite:///{d}/mlflow.db", "name": "tiny"})
    tracking.setup(cfg)
    torch.manual_seed(0)
    model = mlp(4, 3, hidden=8).eval()
    with mlflow.start_run():
        version = tracking.log_model(
            model,
            np.zeros((2, 4), np.float32),
            cfg,
            ["a", "b", "c"],
            ["w", "x", "y", "z"],
            {"shipyard.data_hash": "test"},
        )
        # a second version, which takes the alias: serving by number must still give version 1
        torch.manual_seed(1)
        v2 = tracking.log_model(
            mlp(4, 3, hidden=8).eval(),
            np.zeros((2, 4), np.float32),
            cfg,
            ["a", "b", "c"],
            ["w", "x", "y", "z"],
            {"shipyard.data_hash": "test"},
        )
    assert (version, v2) == ("1", "2")
    mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"model": "models:/tiny@champion", "tracking_uri": cfg.tracking_uri, "max_instances": 8}),
        name="tiny",
        route_prefix="/",
    )
    wait_until_routed(f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}", model, cfg.tracking_uri
    shutdown_serve()


def test_predict_answers_with_labels_and_version(endpoint):
    url, model, _ = endpoint
    rows = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    body = requests.post(f"{url}/predict", json={"instances": rows.tolist()}, timeout=30).json()
    expected = [["a", "b", "c"][i] for i in model(torch.from_numpy(rows)).argmax(1).tolist()]
    assert body == {"predictions": expected, "model_version": "1"}


def test_health_metadata_and_openapi(endpoint):
    url, _, _ = endpoint
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    meta = requests.get(f"{url}/metadata", timeout=10).json()
    assert meta["model_name"] == "tiny" and meta["schema"]["features"] == 4
    assert "/predict" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.parametrize(
    "body, status, match",
    [
        (
            {"instances": [[1, 2, 3]]},
            422,
            "instances[0] has 3 features; the model takes 4 (w, x, y, z) (model tiny v1)",
        ),
        ({"instances": [{"w": 1, "x": 2, "y": 3}]}, 422, "instances[0]: missing z (the model takes w, x, y, z)"),
        ({"instances": [[1, 2, "x", 4]]}, 422, "Input should be a valid number"),
        ({"instances": [[1, 2, "3.5", 4]]}, 422, "Input should be a valid number"),
        ({"instances": [[1, 2, True, 4]]}, 422, "Input should be a valid number"),
        ({"instances": []}, 422, "at least 1"),
        ({"rows": [[1, 2, 3, 4]]}, 422, "instances"),
        ({"instances": [[1, 2, 3, 4]] * 9}, 413, "9 instances in one request; the limit is 8"),
    ],
)
def test_malformed_bodies_get_4xx_naming_the_problem(endpoint, body, status, match):
    url, _, _ = endpoint
    resp = requests.post(f"{url}/predict", json=body, timeout=30)
    assert resp.status_code == status
    assert match in resp.text


def test_nan_not_json_and_huge_bodies_are_rejected_and_server_stays_up(endpoint):
    url, _, _ = endpoint
    nan = requests.post(
        f"{url}/predict",
        data='{"instances": [[NaN, 1, 2, 3]]}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert nan.status_code == 422
    assert (
        requests.post(
            f"{url}/predict", data="{not json", headers={"content-type": "application/json"}, timeout=30
        ).status_code
        == 422
    )
    big = requests.post(
        f"{url}/predict",
        data=json.dumps({"instances": [[0.0] * 4] * 200_000}),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert big.status_code == 413
    assert requests.post(f"{url}/predict", json={"instances": [[0, 0, 0, 0]]}, timeout=30).status_code == 200


def test_a_body_streamed_without_end_is_cut_off_at_the_limit_and_memory_stays_flat(endpoint):
    """256 MiB sent chunked (no Content-Length to refuse it by): the replica stops reading at max_body_bytes."""
    import psutil
    import ray
    from ray.util.state import list_actors

    url, _, _ = endpoint
    replicas = [
        psutil.Process(a.pid)
        for a in list_actors(
            address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000
        )
        if a.class_name.startswith("ServeReplica:tiny:")
    ]
    assert replicas
    before = sum(p.memory_info().rss for p in replicas)
    chunk = b"[" + b"0.0," * (1 << 18)  # 1 MiB of an endless JSON array

    def endless():
        yield b'{"instances": [['
        for _ in range(256):
            yield chunk

    try:
        status = requests.post(
            f"{url}/predict", data=endless(), headers={"content-type": "application/json"}, timeout=60
        ).status_code
    except requests.ConnectionError:
        status = None  # the server answered 413 and closed while the client was still sending
    assert status in (413, None)
    grown_mib = (sum(p.memory_info().rss for p in replicas) - before) / 2**20
    assert grown_mib < 64, f"replicas grew {grown_mib:.0f} MiB reading a body they should have cut off"
    assert requests.post(f"{url}/predict", json={"instances": [[0, 0, 0, 0]]}, timeout=30).status_code == 200


def test_concurrent_requests_of_different_sizes_each_get_their_own_answers(endpoint):
    """Requests are batched together (@serve.batch); every caller must still get exactly its rows back."""
    from concurrent.futures import ThreadPoolExecutor

    url, model, _ = endpoint
    rng = np.random.default_rng(1)
    payloads = [rng.normal(size=(n, 4)).astype(np.float32) for n in (1, 3, 8, 2, 5, 1, 7, 4) * 4]

    def ask(rows):
        return requests.post(f"{url}/predict", json={"instances": rows.tolist()}, timeout=60).json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, payloads))
    for rows, answer in zip(payloads, answers):
        expected = [["a", "b", "c"][i] for i in model(torch.from_numpy(rows)).argmax(1).tolist()]
        assert answer["predictions"] == expected


def test_a_registered_version_can_be_served_by_number(ray_local, endpoint):
    from ray import serve

    url, _, tracking_uri = endpoint
    mlflow.MlflowClient(tracking_uri).set_registered_model_alias("tiny", "champion", "2")
    from ray.serve.api import _run

    # both apps start at once (a replica's start is mostly imports: the two share the 2 cores), then both are
    # waited for; serve.run would wait for the first before starting the second
    _run(
        build_app({"model": "models:/tiny/1", "tracking_uri": tracking_uri}),
        name="tiny-v1",
        route_prefix="/v1",
        _blocking=False,
    )
    _run(
        build_app({"model": "models:/tiny@champion", "tracking_uri": tracking_uri}),
        name="tiny-champion",
        route_prefix="/champion",
        _blocking=False,
    )
    deadline = time.monotonic() + 120
    while {serve.status().applications[n].status for n in ("tiny-v1", "tiny-champion")} != {"RUNNING"}:
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.2)
    wait_until_routed(f"{url}/v1")
    wait_until_routed(f"{url}/champion")
    try:
        ask = {"instances": [[0, 0, 0, 0]]}
        assert requests.post(f"{url}/v1/predict", json=ask, timeout=30).json()["model_version"] == "1"
        assert requests.post(f"{url}/champion/predict", json=ask, timeout=30).json()["model_version"] == "2"
    finally:
        # not waiting for their replicas to drain: the module's serve.shutdown() stops what is still stopping
        serve.delete("tiny-v1", _blocking=False)
        serve.delete("tiny-champion", _blocking=False)
        mlflow.MlflowClient(tracking_uri).set_registered_model_alias("tiny", "champion", "1")
