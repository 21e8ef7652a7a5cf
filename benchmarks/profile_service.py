"""Where a request's time goes in our service under load: py-spy samples of the server, grouped by stage.

    make setup
    .venv/bin/python -m benchmarks.profile_service --concurrency 32 --seconds 10 --set backend=onnx workers=1

Starts `puppet-cnn serve` (settings as PUPPET_* key=value pairs), drives it with wrk (the JSON bodies of
`python -m benchmarks.peer_bench`), samples every thread of the server with py-spy (idle samples left out; a thread
inside onnxruntime or torch counts as active) and prints, per thread, the share of samples in each stage: HTTP (uvicorn,
Starlette/FastAPI routing and middleware), body parsing (JSON, base64), decode (Pillow, resize, normalise),
complexity, batching and queue, the model, response encoding (top-k, JSON), metrics and logging.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.service_bench import WRK_SCRIPT, Server, run_wrk, write_images

# first matching rule wins, tried from the innermost frame outwards
STAGES = [
    # py-spy names a frame `function (path:line)`
    ("model", ("onnxruntime", "predict (service/backends.py", "_run (service/backends.py", "puppet.py", "torch/nn/")),
    ("complexity", ("complexity.py", "complexity (service/backends.py")),
    ("decode", ("imaging.py", "PIL/", "decoding.py")),
    ("body parsing", ("uploads.py", "json/decoder.py", "base64.py", "multipart")),
    ("response encoding", ("top_k (service/routes.py", "json/encoder.py", "render (starlette", "JSONResponse")),
    ("metrics and logging", ("prometheus_client", "logs.py", "logging/")),
    ("batching and queue", ("batcher.py",)),
    ("HTTP and framework", ("uvicorn", "starlette", "fastapi", "httptools", "h11", "asyncio", "uvloop", "anyio")),
]


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def profile(settings: dict[str, str], concurrency: int, seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(200, tmp)
        script = tmp / "classify.lua"
        script.write_text(WRK_SCRIPT)
        server = Server(settings)
        try:
            run_wrk(f"{server.url}/classify", concurrency, 2, script, images, "json")  # warm-up
            raw = tmp / "profile.txt"
            spy = subprocess.Popen(
                [
                    shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy",
                    "record",
                    "--pid",
                    str(server.proc.pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--threads",
                    "--nonblocking",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            result = {}
            load = threading.Thread(
                target=lambda: result.update(
                    run_wrk(f"{server.url}/classify", concurrency, seconds + 1, script, images, "json")
                )
            )
            load.start()
            spy.wait()
            load.join()
        finally:
            server.stop()
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        hot: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in raw.read_text().splitlines():
            stack_text, _, n = line.rpartition(" ")
            frames = stack_text.split(";")
            counts[_thread_name(frames[0])][stage_of(frames[1:])] += int(n)
            hot[_thread_name(frames[0])][frames[-1]] += int(n)
    return {
        "load": result,
        "samples": {t: dict(c) for t, c in counts.items()},
        "hottest_frames": {t: dict(c.most_common(15)) for t, c in hot.items()},
    }


def _thread_name(label: str) -> str:
    """py-spy's raw label is `thread (<tid>): <name>`; name the two threads that matter by their role."""
    name = label.partition(": ")[2]
    return {"MainThread": "event loop", "puppet-inference-worker": "inference worker"}.get(name, "other threads")


def render(report: dict) -> str:
    lines = []
    for thread, c in sorted(report["samples"].items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(c.values())
        lines.append(f"{thread}: {total} samples")
        for stage, n in sorted(c.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {stage:<22} {100 * n / total:5.1f}%")
        for frame, n in report["hottest_frames"][thread].items():
            lines.append(f"    self {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--set", nargs="*", default=[], help="PUPPET_* settings as key=value, e.g. backend=onnx")
    p.add_argument("--out", default=None, help="write the report as JSON")
    args = p.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.set)
    report = profile(settings, args.concurrency, args.seconds)
    load = report["load"]
    print(f"load: {load.get('rps', 0):.0f} req/s, p50 {load.get('p50', 0):.1f} ms, p99 {load.get('p99', 0):.1f} ms")
    print(render(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
