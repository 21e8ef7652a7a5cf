"""The shipped checkpoint behind the FastAPI endpoint a user writes first: the model per request, no batching.

A pydantic body, a route that decodes the image and runs the model on it (a batch of one), uvicorn with the
service's settings (no access log). The route is a plain `def` by default, which FastAPI runs in its
thread pool (what its documentation recommends for blocking work); `--async-route` makes it `async def`,
so the model runs on the event loop, one request at a time.

    python -m benchmarks.peers.plain_fastapi --port 8002

POST /classify with JSON {"image": "<base64 png>"}; GET /health is 200 once the model is loaded.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.peers.common import Engine, arguments


class Body(BaseModel):
    image: str


def create_app(engine: Engine, *, async_route: bool = False) -> FastAPI:
    app = FastAPI()

    def run(body: Body) -> dict:
        return engine.classify(engine.decode_b64(body.image).unsqueeze(0))[0]

    if async_route:

        @app.post("/classify")
        async def classify_async(body: Body) -> dict:
            return run(body)

    else:

        @app.post("/classify")
        def classify_sync(body: Body) -> dict:
            return run(body)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--async-route", action="store_true", help="async def route: the model runs on the event loop")
    args = p.parse_args(argv)
    app = create_app(Engine(args.checkpoint, args.backend, args.onnx_dir), async_route=args.async_route)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
