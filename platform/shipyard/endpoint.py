"""The HTTP endpoint: a Ray Serve deployment with a FastAPI ingress over a registered MLflow model.

    serve run serving.app:build_app model=models:/digits@champion

`POST /predict {"instances": [[...], ...]}` -> `{"predictions": [...], "model_version": "3"}`;
`GET /healthz`; `GET /metadata`; OpenAPI at `/docs`. The model is loaded in torch.export form
(weights and a graph, no pickle) and requests are batched with `@serve.batch`.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request model class
# on the route signature, or it takes `body` for a query parameter.
import logging
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat
from ray import serve

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # strict: "1.5" and true are not numbers (ints are accepted as floats)
    instances: list[list[StrictFloat]] = Field(..., min_length=1, description="rows of numeric features")


class PredictResponse(BaseModel):
    predictions: list[Any]
    model_version: str


app = FastAPI(title="Shipyard model endpoint")


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    # Refuse big bodies from the header, before reading them into memory.
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return JSONResponse({"detail": f"request body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte limit"},
                            status_code=413)
    return await call_next(request)


def resolve_model_uri(uri: str) -> tuple[str, str]:
    """`models:/name@alias` or `models:/name/3` -> (name, version)."""
    import mlflow

    if not uri.startswith("models:/"):
        raise ValueError(f"model must be a registry URI models:/<name>@<alias> or models:/<name>/<version>, got {uri}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    return name, version


@serve.deployment(health_check_period_s=5, max_ongoing_requests=64)
@serve.ingress(app)
class Predictor:
    def __init__(self, model: str, tracking_uri: str | None = None, max_instances: int = 1024,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005):
        import mlflow
        import torch

        torch.set_num_threads(1)  # many small requests: threads would only contend for the 2 cores
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.name, self.version = resolve_model_uri(model)
        uri = f"models:/{self.name}/{self.version}"
        self.model = mlflow.pytorch.load_model(uri)
        info = mlflow.models.get_model_info(uri)
        meta = info.metadata or {}
        self.classes = meta.get("classes")
        inputs = info.signature.inputs.to_dict()[0] if info.signature else {}
        shape = inputs.get("tensor-spec", {}).get("shape", [-1, None])
        self.num_features = shape[-1]
        self.max_instances = max_instances
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("serving %s v%s (%s features, %s classes)", self.name, self.version, self.num_features,
                 len(self.classes or []))

    def _classify(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x)).argmax(1).numpy()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, requests: list[np.ndarray]) -> list[list[Any]]:
        sizes = [len(r) for r in requests]
        idx = self._classify(np.concatenate(requests))
        labels = [self.classes[i] for i in idx] if self.classes else idx.tolist()
        out, start = [], 0
        for n in sizes:
            out.append(labels[start:start + n])
            start += n
        return out

    @app.post("/predict", response_model=PredictResponse)
    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        n = len(body.instances)
        if n > self.max_instances:
            raise HTTPException(413, f"{n} instances in one request; the limit is {self.max_instances}")
        bad = next((i for i, row in enumerate(body.instances) if len(row) != self.num_features), None)
        if bad is not None:
            raise HTTPException(422, f"instances[{bad}] has {len(body.instances[bad])} features; "
                                     f"model {self.name} v{self.version} expects {self.num_features}")
        x = np.asarray(body.instances, dtype=np.float32)
        if not np.isfinite(x).all():
            row = int(np.argwhere(~np.isfinite(x))[0][0])
            raise HTTPException(422, f"instances[{row}] holds NaN or Infinity; send finite numbers")
        return {"predictions": await self._predict_batch(x), "model_version": self.version}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.name, "model_version": self.version}

    @app.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version,
                "schema": {"features": self.num_features, "dtype": "float32"}, "classes": self.classes}


def build_app(args: dict[str, str]) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=models:/digits@champion [key=value]`.

    Keys: model (required), tracking_uri (default $MLFLOW_TRACKING_URI or MLflow's default), num_replicas,
    max_batch_size, batch_wait_timeout_s, max_instances, cpus_per_replica.
    """
    known = {"model", "tracking_uri", "num_replicas", "max_batch_size", "batch_wait_timeout_s", "max_instances",
             "cpus_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for build_app; valid: {sorted(known)}")
    if "model" not in args:
        raise ValueError("build_app needs model=models:/<name>@<alias> (e.g. models:/digits@champion)")
    deployment = Predictor.options(
        num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("cpus_per_replica", 0.5))},
    )
    return deployment.bind(
        model=args["model"],
        tracking_uri=args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        max_instances=int(args.get("max_instances", 1024)),
        max_batch_size=int(args.get("max_batch_size", 32)),
        batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.005)),
    )
