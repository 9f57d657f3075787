"""The endpoint's pure parts, without Ray: model URIs, arguments, and the API-key / body-size guard."""

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from shipyard import ConfigError, ServingError, build_app, load_config
from shipyard.config import EndpointConfig
from shipyard.serve.endpoint import AppArgs, UserConfig, _Guard
from shipyard.track.registry import ModelRef

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "uri, ref",
    [
        ("models:/digits@champion", ModelRef("digits", alias="champion")),
        ("models:/digits/3", ModelRef("digits", version="3")),
    ],
)
def test_model_uris_parse(uri, ref):
    assert ModelRef.parse(uri) == ref


@pytest.mark.parametrize(
    "uri, match",
    [
        ("digits@champion", "must be a registry URI"),
        ("models:/", "must be a registry URI"),
        ("models:/digits/latest", "must be a number"),
        ("runs:/abc/model", "must be a registry URI"),
    ],
)
def test_bad_model_uris_say_what_is_expected(uri, match):
    with pytest.raises(ServingError, match=match):
        ModelRef.parse(uri)


def test_the_shipped_serve_config_args_are_valid_app_args():
    app = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())["applications"][0]
    assert app["import_path"] == "shipyard.serve.endpoint:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.model == "models:/digits@champion" and args.cpus_per_replica == 0.5
    in_place = UserConfig.model_validate(app["deployments"][0]["user_config"])  # a typo there fails here
    assert in_place.model == args.model and in_place.refresh_s == 2


def test_build_app_names_bad_and_unknown_keys():
    with pytest.raises(ServingError, match=r"max_batch_size: Input should be a valid integer.*valid keys"):
        build_app({"model": "models:/x@champion", "max_batch_size": "many"})
    with pytest.raises(ServingError, match=r"max_batchsize: Extra inputs are not permitted"):
        build_app({"model": "models:/x@champion", "max_batchsize": 8})
    with pytest.raises(ServingError, match=r"model: Field required"):
        build_app({})
    # strings from `serve run ... key=value` are numbers where numbers are due
    app = build_app(
        {
            "model": "models:/x@champion",
            "max_batch_size": "8",
            "num_replicas": "2",
            "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        }
    )
    deployment = app._bound_deployment  # what Serve will deploy
    assert deployment._deployment_config.user_config["max_batch_size"] == 8
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3


def test_endpoint_knobs_are_checked_together():
    with pytest.raises(ValueError, match="batches could never fill"):
        EndpointConfig(max_batch_size=64, max_ongoing_requests=32)
    with pytest.raises(ValueError, match="no canary_model is set"):
        EndpointConfig(canary_share=0.2)
    with pytest.raises(ConfigError, match="serve.autoscaling"):
        load_config(None, {"serve.autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def _call(guard_settings, method="POST", path="/predict", headers=(), chunks=(b"{}",)):
    """Run one request through _Guard in front of an app that echoes the body it got."""

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0)

    sent = []

    async def send(message):
        sent.append(message)

    guard = _Guard(app)
    for k, v in guard_settings.items():
        setattr(guard, k, v)
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": list(headers)}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_guard_passes_a_small_body_through_whole():
    assert _call({}, chunks=(b'{"inst', b'ances": []}')) == (200, b'{"instances": []}')


def test_guard_refuses_big_bodies_by_header_and_by_counting_chunks():
    status, body = _call({"max_body_bytes": 10}, headers=[(b"content-length", b"11")], chunks=(b"x" * 11,))
    assert status == 413 and "11 bytes exceeds the 10-byte limit" in json.loads(body)["detail"]
    status, body = _call({"max_body_bytes": 10}, chunks=(b"x" * 6, b"x" * 6))  # chunked: no length header
    assert status == 413 and "exceeds the 10-byte limit" in json.loads(body)["detail"]


def test_guard_checks_the_api_key_except_on_open_paths():
    key = {"api_key_sha256": hashlib.sha256(b"k").hexdigest()}
    assert _call(key)[0] == 401
    assert _call(key, headers=[(b"x-api-key", b"wrong")])[0] == 401
    assert _call(key, headers=[(b"x-api-key", b"k")])[0] == 200
    assert _call(key, method="GET", path="/healthz", chunks=(b"",))[0] == 200


def test_cluster_nodes_start_ray_with_fast_ingress_and_haproxy_extras_on_loopback(tmp_path):
    """cluster.yaml's start commands eval `shipyard fast-ingress-env`; the wrapper it names rewrites only
    HAProxy's stats and metrics binds (Ray renders them on all interfaces) and keeps the Serve frontend."""
    import os
    import subprocess

    from shipyard.serve.ingress import fast_ingress_env

    commands = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any('eval "$(shipyard fast-ingress-env)"' in c and "ray start" in c for c in commands[key])
    env = fast_ingress_env(free_ports=False)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and "RAY_SERVE_HAPROXY_STATS_PORT" not in env
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "frontend prometheus\n    bind :9101\nlisten stats\n  bind *:8404\n"
        "frontend http_frontend\n    bind *:8000\n    bind 127.0.0.1:8001\n"
    )
    node_env = {
        k: v
        for k, v in os.environ.items()  # a cluster node: Ray's default ports (8404, 9101)
        if k not in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
    }
    subprocess.run(
        [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(cfg)],
        check=True,
        env={**node_env, "SHIPYARD_HAPROXY_BINARY": "/bin/true"},
    )
    assert [line for line in cfg.read_text().split("\n") if "bind" in line] == [
        "    bind 127.0.0.1:9101",
        "  bind 127.0.0.1:8404",
        "    bind *:8000",
        "    bind 127.0.0.1:8001",
    ]
