"""The endpoint in production: alias moves under load, rollback, canary split, API key, fuzzing.

Three small versions of one registered model on one Serve instance. Tests that change the app's model or its
settings deploy their own Serve app; the tests that only send requests to a default app share one (`plain`).
"""

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from shipyard import build_app, load_config
from shipyard.cli import main as shipyard_main
from shipyard.serve.ingress import wait_until_routed
from shipyard.tasks import task_of
from shipyard.tasks.models import mlp
from shipyard.track import registry
from shipyard.track import runs as tracking
from tests.helpers import free_port, raylet_processes, shutdown_serve

pytestmark = pytest.mark.ray
ROW = {"instances": [[0.1, 0.2, 0.3, 0.4]]}


@pytest.fixture(scope="module")
def registry_uri(ray_local, tmp_path_factory):
    """Versions 1, 2, 3 of `svc`; v1 is champion. Serve on a free loopback port."""
    from ray import serve

    d = tmp_path_factory.mktemp("serving")
    cfg = load_config(None, {"tracking.uri": f"sqlite:///{d}/mlflow.db", "name": "svc"})
    tracking.setup(cfg)
    with mlflow.start_run():
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            tracking.log_model(
                mlp(4, 3, hidden=8).eval(), np.zeros((2, 4), np.float32), cfg, ["a", "b", "c"], ["w", "x", "y", "z"], {}
            )
    registry.set_champion("svc", "1", "test fixture")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield cfg.tracking_uri, f"http://127.0.0.1:{port}"
    shutdown_serve()


def _run_app(registry_uri, name, **args) -> str:
    from ray import serve

    uri, base = registry_uri
    serve.run(
        build_app({"model": "models:/svc@champion", "tracking_uri": uri, **args}), name=name, route_prefix=f"/{name}"
    )
    wait_until_routed(f"{base}/{name}")
    return f"{base}/{name}"


@pytest.fixture
def deploy(registry_uri):
    """deploy(name, **args) -> base URL of a Serve app at /<name>; deleted after the test."""
    from ray import serve

    names = []

    def _deploy(name, **args):
        names.append(name)
        return _run_app(registry_uri, name, **args)

    yield _deploy
    for name in names:
        # not waiting for the replicas to drain (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S): the next
        # test's app has its own route, and the module's serve.shutdown() stops whatever is still stopping
        serve.delete(name, _blocking=False)


@pytest.fixture(scope="module")
def plain(registry_uri):
    """One app with the default settings, shared by the tests that only send it requests (none changes it)."""
    from ray import serve

    url = _run_app(registry_uri, "plain")
    yield url
    serve.delete("plain", _blocking=False)


# How long any request of these tests may wait for its answer: the load's and the probes' alike. On a 2-core CI
# machine a replica that is starting or loading a new model while 4 clients post held a /metadata probe past
# 10 s; that is slow, not failed, and the load's own answers (30 s) are what the tests judge.
REQUEST_TIMEOUT_S = 30


class Load:
    """Clients posting back to back until stopped; records every status and answering version in order."""

    def __init__(self, url: str, clients: int = 4, headers: dict | None = None):
        self.url, self.headers = url, headers or {}
        self.answers: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    r = s.post(f"{self.url}/predict", json=ROW, headers=self.headers, timeout=REQUEST_TIMEOUT_S)
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.answers.append((time.monotonic(), r.status_code, version))
                except requests.RequestException as err:
                    self.answers.append((time.monotonic(), 0, repr(err)))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def failed(self):
        return [a for a in self.answers if a[1] != 200]

    def wait_answers(self, more: int, timeout_s: float = 120) -> int:
        """Until `more` further answers came (a fault lands under load however fast the machine answers);
        returns how many there are."""
        target = len(self.answers) + more
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < target:
            assert time.monotonic() < deadline, f"{len(self.answers)}/{target} answers in {timeout_s} s"
            time.sleep(0.05)
        return len(self.answers)


def wait_for_version(url, version, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # 404 while a `serve deploy` is still starting the app
        r = requests.get(f"{url}/metadata", timeout=REQUEST_TIMEOUT_S)
        if r.status_code == 200 and r.json()["model_version"] == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} still serves {requests.get(f'{url}/metadata', timeout=REQUEST_TIMEOUT_S).json()}")


def test_moving_the_alias_under_load_switches_versions_with_no_failed_request(registry_uri, deploy):
    uri, _ = registry_uri
    url = deploy("swap", refresh_s=0.5, num_replicas=2)
    with Load(url) as load:
        load.wait_answers(200)
        registry.set_champion("svc", "2", "test: promote under load")
        wait_for_version(url, "2")
        load.wait_answers(200)
    registry.set_champion("svc", "1", "test: restore")
    versions = [v for _, _, v in load.answers]
    assert load.failed() == [], load.failed()[:5]
    assert len(versions) > 100
    assert versions[0] == "1" and versions[-1] == "2"
    # once every replica swapped, v1 never answers again (each replica swaps once, atomically)
    last_v1 = max(i for i, v in enumerate(versions) if v == "1")
    assert set(versions[last_v1 + 1 :]) == {"2"} and len(versions) - last_v1 > 50


def test_promote_and_rollback_commands_move_the_alias_and_the_endpoint_follows(registry_uri, deploy, capsys):
    uri, _ = registry_uri
    url = deploy("rollback", refresh_s=0.5)
    assert shipyard_main(["promote", "svc", "3", "--tracking-uri", uri]) == 0
    assert "champion v1 -> v3" in capsys.readouterr().out
    wait_for_version(url, "3")
    assert shipyard_main(["rollback", "svc", "--tracking-uri", uri]) == 0
    assert "champion v3 -> v1" in capsys.readouterr().out
    wait_for_version(url, "1")
    assert requests.post(f"{url}/predict", json=ROW, timeout=30).json()["model_version"] == "1"
    # the history goes back one step per rollback; an unknown model or version is a clear error, exit 2
    assert shipyard_main(["promote", "svc", "99", "--tracking-uri", uri]) == 2
    assert shipyard_main(["rollback", "nosuchmodel", "--tracking-uri", uri]) == 2


def test_canary_answers_its_share_and_every_answer_names_its_version(deploy):
    url = deploy("canary", canary_model="models:/svc/2", canary_share=0.3, refresh_s=0)
    meta = requests.get(f"{url}/metadata", timeout=REQUEST_TIMEOUT_S).json()
    assert meta["model_version"] == "1" and meta["canary"] == {"model_version": "2", "share": 0.3}
    with requests.Session() as s:
        versions = Counter(s.post(f"{url}/predict", json=ROW, timeout=30).json()["model_version"] for _ in range(600))
    assert set(versions) == {"1", "2"}
    # binomial(600, 0.3): sd 0.019; 0.3 +- 0.08 is beyond 4 sd
    assert abs(versions["2"] / 600 - 0.3) < 0.08, versions


def test_api_key_is_required_where_configured(deploy, monkeypatch):
    monkeypatch.setenv("SVC_TEST_KEY", "s3cret-key")
    url = deploy("keyed", api_key_env="SVC_TEST_KEY")
    assert requests.post(f"{url}/predict", json=ROW, timeout=30).status_code == 401
    wrong = requests.post(f"{url}/predict", json=ROW, headers={"X-API-Key": "guess"}, timeout=30)
    assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["detail"]
    assert requests.get(f"{url}/metadata", timeout=30).status_code == 401
    ok = requests.post(f"{url}/predict", json=ROW, headers={"X-API-Key": "s3cret-key"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"
    # load balancers and humans can still read health and the API description
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/openapi.json", timeout=30).status_code == 200


def test_api_key_env_unset_fails_at_build_time(monkeypatch):
    from shipyard import ServingError

    monkeypatch.delenv("SVC_NO_SUCH_KEY", raising=False)
    with pytest.raises(ServingError, match=r"api_key_env=SVC_NO_SUCH_KEY but \$SVC_NO_SUCH_KEY is empty or unset"):
        build_app({"model": "models:/svc@champion", "api_key_env": "SVC_NO_SUCH_KEY"})


BAD_REQUESTS = [
    # (method, path, body bytes, content type, expected status)
    ("POST", "/predict", b"", "application/json", 422),
    ("POST", "/predict", b"[]", "application/json", 422),
    ("POST", "/predict", b'{"instances": 5}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [1, 2, 3, 4]}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[[1, 2, 3, 4]]]}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[1, 2, 3, 1e999]]}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[1, 2, 3, -Infinity]]}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[1, 2, 3, 1e39]]}', "application/json", 422),  # inf in float32
    ("POST", "/predict", b'{"instances": [[1, 2, 3, null]]}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[1, 2, 3, 4]], "extra": 1}', "application/json", 422),
    ("POST", "/predict", b'{"instances": [[1, 2, 3, 4]]', "application/json", 422),
    ("POST", "/predict", b"\xff\xfe\x00garbage", "application/json", 422),
    ("POST", "/predict", b"instances=1", "application/x-www-form-urlencoded", 422),
    ("POST", "/predict", b'{"instances": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "application/json", 422),
    ("GET", "/predict", b"", "application/json", 405),
    ("PUT", "/metadata", b"{}", "application/json", 405),
    ("POST", "/nowhere", b"{}", "application/json", 404),
]


def test_hand_written_bad_requests_get_4xx_and_the_app_keeps_answering(plain):
    url = plain
    for method, path, body, ctype, status in BAD_REQUESTS:
        r = requests.request(method, f"{url}{path}", data=body, headers={"content-type": ctype}, timeout=30)
        assert r.status_code == status, (method, path, body[:60], r.status_code, r.text[:200])

    def chunked_body():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"instances": ['
        for _ in range(50_000):
            yield b"[0.0, 0.0, 0.0, 0.0]," * 10
        yield b"[0, 0, 0, 0]]}"

    big = requests.post(f"{url}/predict", data=chunked_body(), headers={"content-type": "application/json"}, timeout=60)
    assert big.status_code == 413 and "limit" in big.text
    assert requests.post(f"{url}/predict", json=ROW, timeout=30).status_code == 200


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_5xx(plain, mode):
    """Every operation of /openapi.json, with schema-valid (positive) and schema-breaking (negative) requests
    generated by schemathesis: never a 5xx, and the app still answers afterwards."""
    from hypothesis import given

    url = plain
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "GET /metadata", "GET /healthz"}
    statuses: Counter = Counter()
    with requests.Session() as session:
        for op in operations:
            if mode == "negative" and op.method.upper() == "GET":
                continue  # no parameters or body to break: nothing negative to generate

            @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call(base_url=url, session=session, timeout=30)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

            check()
    assert sum(statuses.values()) >= 40, statuses
    if mode == "negative":
        assert any(400 <= code < 500 for code in statuses), statuses
    assert requests.post(f"{url}/predict", json=ROW, timeout=30).status_code == 200


def test_every_port_of_the_fast_ingress_listens_on_loopback(plain):
    """HAProxy answers the Serve port (fast ingress is on), and its stats and metrics ports are not
    reachable from other hosts (Ray's template binds them to all interfaces; bin/haproxy-loopback)."""
    import psutil

    url = plain
    assert requests.post(f"{url}/predict", json=ROW, timeout=30).status_code == 200
    port = int(url.split(":")[2].split("/")[0])
    haproxies = [
        p
        for p in psutil.process_iter(["name", "cmdline", "environ"])
        if p.info["name"] == "haproxy"
        and os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]
        in (p.info["environ"] or {}).get("RAY_SERVE_HAPROXY_STATS_PORT", "")
    ]
    assert haproxies, "no HAProxy of this Ray: fast ingress is off"
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in haproxies
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert ("127.0.0.1", port) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert len(listening) >= 3  # the Serve port, stats, Prometheus


def test_serve_deploy_reconfigures_in_place_or_rolls_without_a_failed_request(ray_local, registry_uri):
    """`serve deploy serving/config.yaml` (this test's registry and port): a new `model` in the deployment's
    user_config swaps the running replica in place; changed `args` roll it (new replica up before the old one
    stops). Under steady load, no request fails in either."""
    import subprocess

    import yaml
    from ray import serve

    uri, base = registry_uri
    config = yaml.safe_load(Path("serving/config.yaml").read_text())
    config["http_options"]["port"] = int(base.rsplit(":", 1)[1])
    app = config["applications"][0]
    app.update(name="declared", route_prefix="/declared")
    app["args"].update(model="models:/svc/1", tracking_uri=uri)
    app["deployments"][0]["user_config"]["model"] = "models:/svc/1"
    dashboard = "http://" + ray_local._private.worker.get_dashboard_url()
    tmp = Path(uri.removeprefix("sqlite:///")).parent
    url = f"{base}/declared"

    def deploy(step: int) -> None:
        path = tmp / f"serve_{step}.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [str(Path(sys.executable).with_name("serve")), "deploy", str(path), "-a", dashboard],
            check=True,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            timeout=120,
        )

    def replica() -> str:
        r = requests.get(f"{url}/metadata", timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()["replica"]

    try:
        deploy(1)
        wait_for_version(url, "1", timeout_s=90)
        wait_until_routed(url)
        first = replica()
        with Load(url) as in_place:
            in_place.wait_answers(100)
            app["deployments"][0]["user_config"]["model"] = "models:/svc/2"
            deploy(2)
            wait_for_version(url, "2", timeout_s=60)
            in_place.wait_answers(100)
        assert replica() == first  # reconfigured, not replaced
        with Load(url) as rolled:
            rolled.wait_answers(100)
            app["args"]["max_instances"] = 512
            deploy(3)
            deadline = time.monotonic() + 90
            while replica() == first and time.monotonic() < deadline:
                time.sleep(0.5)
            rolled.wait_answers(100)
        assert replica() != first
        for load in (in_place, rolled):
            assert load.failed() == [], load.failed()[:5]
        assert [v for _, _, v in in_place.answers][0] == "1" and {v for _, _, v in in_place.answers} == {"1", "2"}
        assert {v for _, _, v in rolled.answers} == {"2"}
    finally:
        serve.delete("declared", _blocking=False)  # stopped for good by the module's serve.shutdown()


def test_serve_run_cli_serves_the_registry_model_through_fast_ingress(registry_uri, tmp_path):
    """`serve run serving.app:build_app model=... tracking_uri=...` from a fresh shell: its own local Ray, fast
    ingress switched on by serving/app.py, loopback port 8000 (Serve's default); Ctrl-C stops it all."""
    import signal
    import subprocess

    import psutil

    uri, _ = registry_uri
    if any(c.laddr.port == 8000 for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN):
        pytest.skip("port 8000 (Serve's default for `serve run`) is taken on this machine")
    env = {
        k: v
        for k, v in os.environ.items()  # a fresh shell: none of this test session's Ray settings
        if not k.startswith(("RAY_SERVE_", "SHIPYARD_HAPROXY", "RAY_ADDRESS"))
    }
    log = (tmp_path / "serve_run.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("serve")),
            "run",
            "serving.app:build_app",
            "model=models:/svc@champion",
            f"tracking_uri={uri}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = requests.post("http://127.0.0.1:8000/predict", json=ROW, timeout=5)
                if answer.status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or HAProxy holding it while the app starts
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, (tmp_path / "serve_run.log").read_text()[-3000:]
        assert answer.json()["model_version"] == "1"
        listeners = [
            c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == 8000
        ]
        assert [psutil.Process(c.pid).name() for c in listeners] == ["haproxy"]
        assert listeners[0].laddr.ip == "127.0.0.1"
    finally:
        family = (
            [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
            if proc.poll() is None
            else [proc.pid]
        )
        raylets = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).name() == "raylet"]
        ray_procs = set(family) | {pid for r in raylets for pid in raylet_processes(r)}
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts Serve and its Ray down
        try:
            proc.wait(timeout=60)
        finally:
            for pid in ray_procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()


def replica_pids(app: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    # the address: another Ray on this machine (a parallel session) makes an address-less call ambiguous
    return [
        a.pid
        for a in list_actors(
            address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000
        )
        if a.class_name.startswith(f"ServeReplica:{app}:")
    ]


def test_a_killed_replica_under_load_costs_no_request_and_is_replaced(deploy):
    from ray import serve

    url = deploy("sturdy", num_replicas=2)
    before = replica_pids("sturdy")
    assert len(before) == 2, before
    with Load(url) as load:
        killed_at = load.wait_answers(1000)
        os.kill(before[0], 9)  # SIGKILL: no draining, requests in flight on it are cut
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = replica_pids("sturdy")
            running = serve.status().applications["sturdy"].deployments["Predictor"].replica_states.get("RUNNING", 0)
            if len(now) == 2 and before[0] not in now and running == 2:
                break
            time.sleep(0.5)
        replaced_at = len(load.answers)
        load.wait_answers(1000)  # steady load on the replacement too
    ok = len(load.answers) - len(load.failed())
    print(
        f"replica {before[0]} killed under load after answer {killed_at}, replaced by answer {replaced_at}: "
        f"{ok}/{len(load.answers)} requests answered 200; failed: {load.failed()[:5]}"
    )
    assert len(load.answers) > 2000  # at 99.9 %, up to 2 failures allowed: a request cut after its headers
    assert ok / len(load.answers) >= 0.999, load.failed()[:5]
    assert len(now) == 2 and before[0] not in now and running == 2  # back to 2 replicas


class Planted(torch.nn.Module):
    """A model whose pickle runs a shell command when unpickled: what a hostile upload to a registry looks like."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_copies(uri: str, marker: Path, tmp_path: Path) -> dict[str, Path]:
    """Copies of svc v1's artifacts made hostile: a pickled record planted in the .pt2 archive, and an MLmodel
    pointing the loader at a pickled model in another folder (data/model.pt2 left in place as a decoy)."""
    import pickle
    import shutil
    import zipfile

    good = Path(mlflow.artifacts.download_artifacts("models:/svc/1", tracking_uri=uri))
    payload = pickle.dumps(Planted(marker))
    planted = tmp_path / "planted-pt2"
    shutil.copytree(good, planted)
    with zipfile.ZipFile(planted / "data" / "model.pt2", "a") as archive:
        prefix = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/data/constants/evil.pt", payload)
    redirect = tmp_path / "redirect"
    shutil.copytree(good, redirect)
    (redirect / "other").mkdir()
    (redirect / "other" / "model.pth").write_bytes(payload)
    mlmodel = (redirect / "MLmodel").read_text()
    (redirect / "MLmodel").write_text(mlmodel.replace("model_data: data", "model_data: other"))
    return {"planted-pt2": planted, "redirect": redirect}


def test_a_model_with_a_planted_pickle_is_refused_without_running_it(registry_uri, tmp_path):
    import pickle

    from mlflow.models import infer_signature

    from shipyard import ServingError

    uri, _ = registry_uri
    marker = tmp_path / "pwned"
    x = np.zeros((2, 4), np.float32)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run():  # a pickle-format model, as `mlflow.pytorch.log_model` still allows
        mlflow.pytorch.log_model(
            Planted(marker),
            name="model",
            serialization_format="pickle",
            signature=infer_signature(x, np.zeros((2, 3), np.float32)),
            registered_model_name="planted",
            pip_requirements=["torch"],
        )  # inferring them would load (and run) it here
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    for name, folder in _hostile_copies(uri, marker, tmp_path).items():
        client.create_registered_model(name)
        client.create_model_version(name, source=str(folder))
    assert not marker.exists()
    for name, match in [
        ("planted", r"not a torch.export model .*data/ holds \['model.pth'.*refuses it"),
        ("planted-pt2", r"refused: .*evil.pt.* is not a pickle-free payload"),
        ("redirect", r"not a torch.export model \(MLmodel: model_data='other'"),
    ]:
        with pytest.raises(ServingError, match=match):
            registry.load(name, "1")
        # the promotion gate goes through the same loader
        classify = task_of(
            {"task": "classification", "input_shape": [4], "output_width": 3, "target": "label", "classes": [0, 1, 2]}
        )
        assert tracking.score_version(name, "1", x, np.zeros(2, np.int64), classify) is None
    assert not marker.exists()  # nothing of them ran
    assert registry.load("svc", "1").num_features == 4  # while a model the pipeline logged loads
    pickle.loads(pickle.dumps(Planted(marker)))  # and unpickling the payload does run it: it is real
    assert marker.exists()
