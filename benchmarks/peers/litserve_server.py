"""The shipped checkpoint served by LitServe with its own batching: the peer a user would most likely pick.

LitServe as it intends to be used: a LitAPI with setup / decode_request / batch / predict / unbatch /
encode_response, one inference worker process on the CPU accelerator, one API server process (its default:
as many as inference workers), `max_batch_size` and `batch_timeout` on the LitAPI. Defaults match the
service's: batches of up to 32, no wait for a partial batch (batch_timeout 0: LitServe takes whatever is
queued and never waits). torch runs one intra-op thread inside the worker, as the service's worker does.

    python -m benchmarks.peers.litserve_server --port 8001

POST /classify with JSON {"image": "<base64 png>"}; GET /health is 200 once the worker is ready.
Run from the repository root in .venv-peers/litserve (make bench-env); litserve is not a dependency of the service.
"""

from __future__ import annotations

import litserve as ls
import torch

from benchmarks.peers.common import Engine, arguments


class PuppetLitAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, backend: str, onnx_dir: str | None, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint, self.backend, self.onnx_dir = checkpoint, backend, onnx_dir

    def setup(self, device):
        self.engine = Engine(self.checkpoint, self.backend, self.onnx_dir)  # one torch thread, in this worker

    def decode_request(self, request):
        return self.engine.decode_b64(request["image"])

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        return self.engine.classify(x)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument(
        "--batch-timeout-ms", type=float, default=0.0, help="the service's PUPPET_MAX_QUEUE_DELAY_MS (0: never wait)"
    )
    p.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport instead of multiprocessing")
    p.add_argument("--workers", type=int, default=1, help="LitServe's workers_per_device (inference processes)")
    args = p.parse_args(argv)
    api = PuppetLitAPI(
        str(args.checkpoint),
        args.backend,
        str(args.onnx_dir) if args.onnx_dir else None,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000,
        api_path="/classify",
    )
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=30, fast_queue=args.fast_queue
    )
    # access_log=False as in the service's uvicorn settings (service/server.py)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
