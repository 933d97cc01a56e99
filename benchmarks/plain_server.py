"""Baseline for the benchmarks: one checkpoint served by a plain FastAPI app under uvicorn.

It scores with the same network and feature encoding as our server and answers the same JSON,
with no validation beyond pydantic's types, no batching and no worker processes.

    python benchmarks/plain_server.py checkpoints/<run>/best.ckpt --port 8100
"""

import argparse

import uvicorn
from fastapi import FastAPI

from purchasenet.inference import PurchaseModel


def build_app(model: PurchaseModel) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/predict")
    def predict(columns: dict[str, list[float | str | bool]]) -> dict:
        probabilities = model.predict_proba(columns)
        decisions = model.decide(probabilities)
        return {
            "predictions": decisions.tolist(),
            "probabilities": probabilities.tolist(),
            "labels": model.labels(decisions),
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = build_app(PurchaseModel.from_checkpoint(args.checkpoint))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
