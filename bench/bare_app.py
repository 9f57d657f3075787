"""Server (d) of bench/serve.py: the least a Python HTTP model server does, as a reference for the others.

    BENCH_MODEL_URI=models:/bench-tiny/1 MLFLOW_TRACKING_URI=sqlite:////abs/mlflow.db \
        uvicorn bench.bare_app:app --workers 2 --host 127.0.0.1 --port 8000

FastAPI on uvicorn, the registered model loaded once per worker with `mlflow.pytorch.load_model`, one torch
thread, a pydantic body `{"instances": [[...], ...]}` and the argmax labels back. No batching, no checks
beyond pydantic's: what is left is HTTP, JSON and one forward pass.
"""

import os

import mlflow.pytorch
import torch
from fastapi import FastAPI
from pydantic import BaseModel

torch.set_num_threads(1)
model = mlflow.pytorch.load_model(os.environ["BENCH_MODEL_URI"])  # a torch.export graph, in eval form

app = FastAPI()


class Body(BaseModel):
    instances: list[list[float]]


@app.post("/predict")
async def predict(body: Body) -> dict:
    with torch.no_grad():
        labels = model(torch.tensor(body.instances, dtype=torch.float32)).argmax(1).tolist()
    return {"predictions": labels}
