"""The shipped checkpoint served by BentoML with its adaptive batching, configured as BentoML documents it.

This process runs `bentoml serve benchmarks.peers.bentoml_service:PuppetCNN` as a child in its process group:
BentoML's process manager (circus) and its workers, each a uvicorn server with the model behind a batchable
endpoint. The settings, each from BentoML's documentation and measured side by side with wrk on this 2-core machine:
- adaptive batching (`@bentoml.api(batchable=True, max_batch_size=32)`), the service's batch limit;
  `max_latency_ms` stays at BentoML's default, 60000: it is not a batching window but a latency objective past
  which BentoML's dispatcher drops queued requests with 503 (1000 ms, the docs' example, dropped some at 32 and 64
  connections on a loaded machine); the wait for a fuller batch is BentoML's own, learnt from traffic;
- `workers="cpu_count"`: one worker process per core (2), BentoML's advice for CPU-bound Python (the GIL);
- `threads=1` (BentoML's default): the dispatcher runs one batch at a time per worker anyway, and the model runs
  one torch / onnxruntime intra-op thread in each worker (common.Engine; OMP_NUM_THREADS=1 from the harness);
- uvicorn with uvloop and httptools (installed from requirements-bentoml.txt, as in the service's environment);
- no access log (as the service's uvicorn settings), Prometheus metrics on (BentoML's default), no usage tracking.

    python -m benchmarks.peers.bentoml_server --port 8003 --backend onnx --onnx-dir /tmp/onnx-peers

POST /classify with BentoML's batchable form: JSON {"images": ["<base64 png>"]} (a list: one image a request),
answer [<Engine.classify answer>] (a list of one). `--api single` serves the peers' contract instead,
{"image": "<base64 png>"} in and one answer out, through the wrapper BentoML documents for single-item requests (a
second Service that calls the batchable one; twice the server CPU per request). GET /readyz (BentoML's readiness
probe, with the Service's __is_ready__ hook) is 200 once every worker has loaded and warmed the model.

Stopping: SIGTERM to this process group stops the workers (BentoML's process manager sends them SIGTERM; uvicorn
ends what is still running after --graceful-shutdown-s), then this process removes BentoML's home folder. The
workers run in sessions of their own (circus calls setsid), so a signal to this process group reaches them only
through their manager; each worker dies with it if it is killed (PR_SET_PDEATHSIG, bentoml_service.die_with_parent),
and the manager gets SIGTERM if this process dies.
Run from the repository root in .venv-peers/bentoml (requirements-bentoml.txt), PYTHONPATH at the root.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGETS = {"batch": "PuppetCNN", "single": "PuppetCNNSingle"}


def arguments(description: str) -> argparse.ArgumentParser:
    """common.arguments' flags and defaults, without importing common (torch): this process becomes BentoML's
    process manager, which never runs the model, and torch's import is seconds of its start-up."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "puppet-cnn-fmnist.safetensors")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="the service's backend classes")
    p.add_argument("--onnx-dir", type=Path, default=None, help="`puppet-cnn export-onnx --out` of the checkpoint")
    p.add_argument("--max-batch-size", type=int, default=32)
    return p


def command(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--api", choices=sorted(TARGETS), default="batch", help="batch: {'images': [..]}; single: {'image'}")
    p.add_argument("--workers", default="cpu_count", help="model workers: a number or cpu_count (BentoML's)")
    p.add_argument("--front-workers", type=int, default=1, help="workers of the --api single wrapper Service")
    p.add_argument(
        "--max-latency-ms", type=int, default=60000, help="BentoML's max_latency_ms (it sheds requests past it: 503)"
    )
    p.add_argument("--graceful-shutdown-s", type=int, default=5, help="after SIGTERM, requests still running are ended")
    p.add_argument("--no-metrics", action="store_true", help="turn BentoML's Prometheus metrics off")
    p.add_argument("--access-log", action="store_true", help="BentoML's access log on (off: as the service)")
    args = p.parse_args(argv)
    if args.backend == "onnx" and args.onnx_dir is None:
        p.error("--backend onnx needs --onnx-dir (puppet-cnn export-onnx --out DIR)")
    bento_args = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "backend": args.backend,
        "max_batch_size": args.max_batch_size,
        "max_latency_ms": args.max_latency_ms,
        "workers": args.workers,
        "front_workers": args.front_workers,
        "metrics": not args.no_metrics,
        "access_log": args.access_log,
    }
    if args.onnx_dir is not None:
        bento_args["onnx_dir"] = str(Path(args.onnx_dir).resolve())
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        f"benchmarks.peers.bentoml_service:{TARGETS[args.api]}",
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--working-dir",
        str(REPO),
        # uvicorn in each worker otherwise waits without end for every request in flight at SIGTERM; with --api single
        # those include readiness probes that came while the model Service was still starting, which never end
        "--timeout-graceful-shutdown",
        str(args.graceful_shutdown_s),
    ]
    for key, value in bento_args.items():
        cmd += ["--arg", f"{key}={value}"]
    env = {
        "BENTOML_DO_NOT_TRACK": "True",  # usage statistics: nothing leaves this machine
        # BentoML's home (its Prometheus multiprocess folder) apart from any other BentoML server; removed at exit
        "BENTOML_HOME": tempfile.mkdtemp(prefix=f"bentoml-peer-{args.port}-"),
        "PYTHONPATH": os.pathsep.join(
            dict.fromkeys(filter(None, [str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]))
        ),
    }
    return cmd, env


def _end_with_parent() -> None:  # in the child, before exec: SIGTERM to it if this process dies
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    cmd, env = command(argv)
    # `bentoml serve` as a child in this process group (the harness's signals reach both), so that this process can
    # remove BentoML's home once the server is gone; a signal sent to this process alone is passed on
    server = subprocess.Popen(cmd, env={**os.environ, **env}, preexec_fn=_end_with_parent)

    def forward(signum: int, _frame: object) -> None:
        if server.poll() is None:
            server.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        return server.wait()
    finally:
        shutil.rmtree(env["BENTOML_HOME"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
