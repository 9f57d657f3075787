"""The HTTP endpoint: a Ray Serve deployment with a FastAPI ingress over registered MLflow models.

    serve run serving.app:build_app model=models:/digits@champion

`POST /predict {"instances": [...]}` -> `{"predictions": [...], "model_version": "3"}`: instances as the
model's task takes them (a table: rows of values in column order, or `{"column": value}` objects; text columns
by category), answers as it gives them (class names, numbers). `GET /healthz`; `GET /metadata` (model,
version, task, the inputs it takes with their categories); OpenAPI at `/docs`.

- Requests are batched with `@serve.batch` (`max_batch_size` 1 turns it off).
- Each replica re-reads the aliases it serves every `refresh_s` and swaps a moved alias in place: a
  promotion or `shipyard rollback` reaches the endpoint without a redeploy and without a failed request.
  `serve deploy` with a changed model/canary in `user_config` reconfigures the replicas in place too.
- `canary_model` answers `canary_share` of the requests; every answer names the version that produced it.
- Bodies over `max_body_bytes` get a 413 before they are parsed; with `api_key_env` set, a request without
  the right `X-API-Key` gets a 401 (health and OpenAPI pages stay open for load balancers and humans).
"""

# No `from __future__ import annotations` here: FastAPI must see the real request model class
# on the route signature, or it takes `body` for a query parameter.
import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from shipyard.config import EndpointConfig, InPlaceConfig, load_config
from shipyard.errors import ServingError
from shipyard.tasks import RequestError
from shipyard.track.registry import ModelRef, ServedModel, load

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/-/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect")
"""Paths answered without an API key: health checks of load balancers, and the API's own description."""


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # what an instance is depends on the model's task (shipyard.tasks): the task validates each one
    instances: list[Any] = Field(
        ...,
        min_length=1,
        description="instances as the model's task takes them: rows "
        "of values in column order, or objects by column name, for a table",
    )


class PredictResponse(BaseModel):
    predictions: list[Any]
    model_version: str


class AppArgs(EndpointConfig):
    """`build_app`'s arguments: the endpoint's knobs plus which model and which registry."""

    model: str
    tracking_uri: str | None = None


class UserConfig(InPlaceConfig):
    """Serve's `user_config` for a replica: what it serves and the knobs it takes in place."""

    model: str


class _Guard:
    """ASGI middleware: API key and body size, checked before FastAPI reads or parses anything.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware costs a task and a
    stream per request, measurable on a tiny model. Settings are set by the replica's constructor (one
    deployment per replica process).
    """

    max_body_bytes = 4 * 1024 * 1024
    api_key_sha256: str | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path, root = scope["path"], scope.get("root_path", "")  # root_path: the app's Serve route_prefix
        if self.api_key_sha256 and path[len(root) :] not in OPEN_PATHS and path not in OPEN_PATHS:
            given = hashlib.sha256(headers.get(b"x-api-key", b"")).hexdigest()
            if not hmac.compare_digest(given, self.api_key_sha256):
                return await _reply(send, 401, "missing or wrong X-API-Key header")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _reply(
                send, 413, f"request body of {int(length)} bytes exceeds the {self.max_body_bytes}-byte limit"
            )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # count a chunked body as it arrives: never hold more than the limit
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _reply(send, 413, f"request body exceeds the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


app = FastAPI(
    title="Shipyard model endpoint", description="Predictions from a model in the MLflow registry, served by Ray Serve."
)
app.add_middleware(_Guard)


# max_surge_percent=100: a rolling update (changed args, code) starts each new replica before stopping an
# old one; Ray's default 0 stops first, and behind HAProxy a one-replica app then answers 404 until the
# new replica is up (seen: 9 s of 404s on a `serve deploy`).
@serve.deployment(health_check_period_s=5, max_surge_percent=100)
@serve.ingress(app)
class Predictor:
    """Serves `user_config["model"]` (and a canary); the model is chosen per request, the batch per model."""

    def __init__(
        self, tracking_uri: str | None, max_instances: int, max_body_bytes: int, api_key_sha256: str | None
    ):  # all from build_app (defaults: EndpointConfig)
        import mlflow
        import torch

        torch.set_num_threads(1)  # many small requests: threads would only contend for the cores
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.max_instances = max_instances
        _Guard.max_body_bytes, _Guard.api_key_sha256 = max_body_bytes, api_key_sha256
        # (champion, challenger, share): replaced as one tuple, so a request never sees half a swap
        self._slots: tuple[ServedModel | None, ServedModel | None, float] = (None, None, 0.0)
        self._refs: tuple[ModelRef | None, ModelRef | None] = (None, None)
        self._lock = threading.Lock()  # the watch thread and reconfigure() never load at the same time
        self._refresh_s, self._share, self._batching = 0.0, 0.0, True
        self._watch: threading.Thread | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runs after __init__ and whenever `serve deploy` changes `user_config`: load what it names.

        All or nothing: a model that cannot be loaded fails the reconfigure and leaves the replica serving
        (and watching) what it served before.
        """
        cfg = UserConfig.model_validate(user_config)
        refs = (ModelRef.parse(cfg.model), ModelRef.parse(cfg.canary_model) if cfg.canary_model else None)
        share = cfg.canary_share if cfg.canary_model else 0.0
        with self._lock:
            self._swap(self._load(refs), share)
            self._refs, self._share = refs, share
        self._predict_batch.set_max_batch_size(cfg.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batching = cfg.max_batch_size > 1
        self._refresh_s = cfg.refresh_s
        if self._refresh_s > 0 and self._watch is None:
            self._watch = threading.Thread(target=self._watch_aliases, name="shipyard-alias-watch", daemon=True)
            self._watch.start()

    def _load(self, refs: tuple[ModelRef, ModelRef | None]) -> tuple[ServedModel, ServedModel | None]:
        """Resolve the references now and load what is not loaded yet (outside the request path)."""
        loaded = {(m.name, m.version): m for m in self._slots[:2] if m is not None}

        def get(ref: ModelRef | None) -> ServedModel | None:
            if ref is None:
                return None
            version = ref.resolve()
            return loaded.get((ref.name, version)) or load(ref.name, version)

        champion, challenger = get(refs[0]), get(refs[1])
        if challenger is not None and challenger.schema()["inputs"] != champion.schema()["inputs"]:
            raise ServingError(
                f"canary {challenger.name} v{challenger.version} takes other inputs than "
                f"{champion.name} v{champion.version} ({challenger.schema()['inputs']} vs "
                f"{champion.schema()['inputs']}): a canary must answer the same requests"
            )
        return champion, challenger

    def _swap(self, models: tuple[ServedModel, ServedModel | None], share: float) -> None:
        before = [m.version if m else None for m in self._slots[:2]]
        self._slots = (*models, share)
        after = [m.version if m else None for m in models]
        if before != after:
            log.info(
                "serving %s v%s%s",
                models[0].name,
                after[0],
                f" with canary v{after[1]} at {share:.0%}" if models[1] else "",
            )

    def _watch_aliases(self) -> None:
        failed: str | None = None  # the last error, logged once until it changes
        while True:
            time.sleep(self._refresh_s or 1.0)
            if self._refresh_s <= 0:
                continue
            try:
                with self._lock:
                    self._swap(self._load(self._refs), self._share)
                failed = None
            except Exception as err:  # registry unreachable, version deleted: keep serving what is loaded
                if str(err) != failed:
                    champion = self._slots[0]
                    log.warning(
                        "could not refresh the served model (still serving %s v%s): %s",
                        champion.name,
                        champion.version,
                        err,
                    )
                failed = str(err)

    def check_health(self) -> None:
        if self._slots[0] is None:
            raise RuntimeError("no model loaded")

    def _pick(self) -> ServedModel:
        champion, challenger, share = self._slots
        return challenger if challenger is not None and random.random() < share else champion

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, items: list[tuple[ServedModel, np.ndarray]]) -> list[list[Any]]:
        out: list[list[Any]] = [[] for _ in items]
        for model in {id(m): m for m, _ in items}.values():  # one forward pass per model in the batch
            mine = [i for i, (m, _) in enumerate(items) if m is model]
            labels = model.predict(np.concatenate([items[i][1] for i in mine]))
            start = 0
            for i in mine:
                n = len(items[i][1])
                out[i], start = labels[start : start + n], start + n
        return out

    # The body is parsed by pydantic-core straight from the bytes, and the answer written as bytes: FastAPI's
    # own body dependency and response validation cost ~15 % of a tiny model's CPU per request (py-spy, c=32).
    # The OpenAPI description is declared by hand from the same models.
    @app.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(self, request: Request) -> Response:
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as err:
            errors = err.errors(include_url=False, include_context=False, include_input=False)
            detail = [{**e, "loc": ["body", *e["loc"]]} for e in errors]  # FastAPI's own 422 shape
            return Response(json.dumps({"detail": detail}, default=str), 422, media_type="application/json")
        model = self._pick()
        rows = body.instances
        if len(rows) > self.max_instances:
            raise HTTPException(413, f"{len(rows)} instances in one request; the limit is {self.max_instances}")
        try:
            x = model.task.parse_instances(rows)
        except RequestError as err:
            raise HTTPException(422, f"{err} (model {model.name} v{model.version})") from None
        labels = await self._predict_batch((model, x)) if self._batching else model.predict(x)
        return Response(
            json.dumps({"predictions": labels, "model_version": model.version}), media_type="application/json"
        )

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        champion = self._slots[0]
        return {"status": "ok", "model": champion.name, "model_version": champion.version}

    @app.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        champion, challenger, share = self._slots
        return {
            "model_name": champion.name,
            "model_version": champion.version,
            "schema": champion.schema(),
            "classes": champion.classes,
            "task": champion.task.name,
            "canary": {"model_version": challenger.version, "share": share} if challenger else None,
            "refresh_s": self._refresh_s,
            "replica": serve.get_replica_context().replica_id.unique_id,
        }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=models:/digits@champion [key=value]`
    and for `serve deploy serving/config.yaml` (its `args:`). Keys: `model`, `tracking_uri` (default
    $MLFLOW_TRACKING_URI, else the project's sqlite file) and every field of `shipyard.config.EndpointConfig`."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in err.errors())
        raise ServingError(f"bad endpoint arguments ({problems}); valid keys: {sorted(AppArgs.model_fields)}") from None
    ModelRef.parse(a.model)  # a malformed URI fails here, not in every replica
    if a.canary_model:
        ModelRef.parse(a.canary_model)
    key_hash = None
    if a.api_key_env:
        key = os.environ.get(a.api_key_env)
        if not key:
            raise ServingError(
                f"api_key_env={a.api_key_env} but ${a.api_key_env} is empty or unset: export the "
                "key in the shell that deploys, or drop api_key_env to serve without one"
            )
        key_hash = hashlib.sha256(key.encode()).hexdigest()
    user_config = UserConfig(**a.model_dump(include=set(UserConfig.model_fields))).model_dump()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": a.cpus_per_replica},
        "max_ongoing_requests": a.max_ongoing_requests,
        "user_config": user_config,
        "logging_config": {"enable_access_log": a.access_log},
    }
    if a.autoscaling:
        options["autoscaling_config"] = a.autoscaling.model_dump()
    else:
        options["num_replicas"] = a.num_replicas
    return Predictor.options(**options).bind(
        # the same default registry as the pipeline and `shipyard promote`: $MLFLOW_TRACKING_URI, else the
        # project's sqlite file
        tracking_uri=a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or load_config(None, {}).tracking_uri,
        max_instances=a.max_instances,
        max_body_bytes=a.max_body_bytes,
        api_key_sha256=key_hash,
    )
