"""The HTTP ceiling: the service's HTTP stack, the same body and decode, and a constant answer; no model.

FastAPI + uvicorn with the service's settings (no access log), an `async def` route that reads the raw body,
parses the JSON, decodes the base64 PNG to the checkpoint's preprocessing on the event loop (as the service
does for small images) and returns a constant JSON answer. What no server of this stack can beat.

    python -m benchmarks.peers.ceiling --port 8003

POST /classify with JSON {"image": "<base64 png>"}; GET /health is 200 at once.
"""

from __future__ import annotations

import base64
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from benchmarks.peers.common import CONSTANT, MAX_PIXELS, arguments
from model import load_checkpoint
from service.imaging import decode


def create_app(checkpoint) -> FastAPI:
    ckpt = load_checkpoint(checkpoint)  # for its preprocessing: the model never runs
    app = FastAPI()
    answer = {"results": [CONSTANT]}

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        payload = json.loads(await request.body())
        decode(base64.b64decode(payload["image"], validate=True), ckpt.preprocessing, max_pixels=MAX_PIXELS)
        return JSONResponse(answer)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    uvicorn.run(create_app(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
