"""The baseline: what a user would write instead of onnxserve.

A plain FastAPI app with an async endpoint at the same v2 path, orjson in and out, one ONNX
Runtime call per request and no batching, served by uvicorn (httptools, uvloop, one worker).
It speaks v2 JSON only; `loadtests/bench/` measures onnxserve against it. It takes from onnxserve
only the repository's layout (`service.model_config`: which folder is the latest version).

    python -m loadtests.baselines.fastapi_baseline --repository model_repository --port 8001
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response

from service.model_config import MODEL_FILE, latest_version_dir

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def latest_model(repository: Path, name: str) -> tuple[int, Path]:
    """The highest version of a model and its model.onnx."""
    folder = latest_version_dir(repository / name)
    return int(folder.name), folder / MODEL_FILE


def create_app(repository: Path, models: list[str], threads: int = 1) -> FastAPI:
    """The baseline app over `models` of a repository, `threads` intra-op threads per session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions: dict[str, tuple[int, ort.InferenceSession]] = {}
    for name in models:
        version, path = latest_model(repository, name)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name] = (version, session)

    app = FastAPI(title="baseline")

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> Response:
        if model not in sessions:
            raise HTTPException(404, f"unknown model '{model}'")
        version, session = sessions[model]
        try:
            doc = orjson.loads(await request.body())
            feeds = {
                t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
                for t in doc["inputs"]
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise HTTPException(400, f"bad request: {exc}") from None
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
        outputs = [
            {"name": n, "datatype": NAMES[a.dtype], "shape": list(a.shape), "data": a.ravel()}
            for n, a in zip(names, results, strict=True)
        ]
        body = {"model_name": model, "model_version": str(version), "outputs": outputs}
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the baseline app."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default="cnn,lstm", help="comma-separated models to load")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    args = p.parse_args(argv)
    app = create_app(args.repository, args.models.split(","), args.threads)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
