"""`python -m benchmarks.service_bench` (`make bench`, `make bench-peers`): bounded load on loopback against real servers, side by side, with wrk.

Every configuration runs as its own `puppet-cnn serve` process (started once, idle while the others are
measured); runs alternate configuration by configuration at each concurrency (A B C A B C ...) so drift
on a noisy machine cancels. Requests cycle through real Fashion-MNIST test images.

The same harness measures peer serving systems (`python -m benchmarks.peer_bench`, `make bench-peers`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.server_process import SERVER_ENV, ServerProcess, free_port, metric_samples, tree_cpu_seconds, wait_ready
from service.settings import SHIPPED_CHECKPOINT

WRK_SCRIPT = """
local bodies = {}
local i = 0
local content_type = "image/png"
function init(args)
  local folder, n, ext = args[1], tonumber(args[2]), args[3] or "png"
  content_type = args[4] or content_type
  for k = 0, n - 1 do
    local f = assert(io.open(string.format("%s/%05d.%s", folder, k, ext), "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
  end
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", wrk.path, {["Content-Type"] = content_type}, bodies[i])
end
function done(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %d, "seconds": %f, "errors": %d, "non2xx": %d, "p50": %f, "p95": %f, "p99": %f}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3))
end
"""


# Request bodies, one file per image in each format: the raw PNG; JSON {"image": "<base64 png>"} (what most peers
# take too); the Open Inference Protocol's JSON with the base64 PNG as a BYTES input (Triton's own HTTP protocol);
# a list of one (a batchable BentoML endpoint takes one list parameter).
BODIES = {
    "png": ("png", "image/png"),
    "json": ("json", "application/json"),
    "triton": ("triton.json", "application/json"),
    "bentoml": ("bentoml.json", "application/json"),
}


@dataclass
class System:
    """One server: our service with PUPPET_* settings, or a peer (`peer` = module and arguments, run with
    `python -m` from the repository root by `python`, given `--port`), and what its requests look like.

    `pause_when_idle`: stop the peer's processes (SIGSTOP) while the others are measured, for a peer that
    burns CPU when idle (LitServe's batch loop polls its queue without sleeping when batch_timeout is 0).
    `body`: the request body's format (BODIES), None for the run's default; `path` and `health`: where it
    classifies and where it says it is ready (a peer's own protocol may put them elsewhere).
    """

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    query: str = ""
    peer: list[str] | None = None
    pause_when_idle: bool = False
    python: str | None = None
    path: str = "/classify"
    body: str | None = None
    health: str = "/health"


class Server(ServerProcess):
    def __init__(self, settings: dict[str, str]):
        super().__init__(settings, env=SERVER_ENV)


REPO = Path(__file__).resolve().parent.parent


class PeerProcess:
    """A peer server (benchmarks/peers/) as a child process group on a free loopback port.

    Same environment as our servers (SERVER_ENV); ready once GET /health answers 200; output to a temporary
    file. It runs in its own session so that stopping it reaches every process it spawned (LitServe's API
    server, inference worker and queue manager).
    """

    def __init__(
        self,
        peer: list[str],
        *,
        env: dict[str, str],
        python: str | None = None,
        health: str = "/health",
        timeout: float = 300.0,
    ):
        if not (REPO / "benchmarks" / "peers").is_dir():
            raise ValueError(f"the peer servers are not here: {REPO / 'benchmarks' / 'peers'} (a source checkout)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", *peer, "--port", str(self.port)],
            cwd=REPO,
            # the model code comes from this source tree, never installed in a peer's environment
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        if wait_ready(self.url + health, timeout, running=lambda: self.proc.poll() is None):
            return
        if self.proc.poll() is not None:
            self._signal(signal.SIGKILL)
            raise RuntimeError(f"peer {peer[0]} exited with {self.proc.returncode}: {self.output()}")
        self.stop()
        raise RuntimeError(f"peer {peer[0]} did not become ready in {timeout:.0f} s: {self.output()}")

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group this process leads (start_new_session)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> str:
        """SIGTERM to the whole group, SIGKILL to what is left after 30 s (or at once once the leader is gone)."""
        self.resume()
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.proc.wait()
        return self.output()


def start(s: System) -> Server | PeerProcess:
    if s.peer:
        return PeerProcess(s.peer, env=SERVER_ENV, python=s.python, health=s.health)
    return Server(s.settings)


def write_images(n: int, folder: Path) -> list[Path]:
    """n test images as PNG files, and beside each the same image in every JSON body of BODIES."""
    from model import load_dataset
    from model.data import encode_png

    data = load_dataset("fashion-mnist", "test").subset(slice(0, n))
    paths = []
    for i, img in enumerate(data.images):
        p = folder / f"{i:05d}.png"
        png = encode_png(img)
        p.write_bytes(png)
        text = base64.b64encode(png).decode("ascii")
        p.with_suffix(".json").write_text(json.dumps({"image": text}))
        triton = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
        p.with_suffix(".triton.json").write_text(json.dumps(triton))
        p.with_suffix(".bentoml.json").write_text(json.dumps({"images": [text]}))
        paths.append(p)
    return paths


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, images: list[Path], body: str = "png") -> dict:
    folder, n = str(images[0].parent), str(len(images))
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{int(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        folder,
        n,
        *BODIES[body],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    out = proc.stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    r["rps"] = (r["requests"] - r["non2xx"]) / r["seconds"]
    return r


def bench(
    systems: list[System],
    concurrencies: list[int],
    *,
    seconds: int,
    repeats: int,
    n_images: int = 200,
    warmup_s: int = 2,
    body: str = "png",
) -> dict:
    systems = list(systems)
    if shutil.which("wrk") is None:
        raise ValueError("wrk is not installed: apt-get install wrk (make bench does it when run as root)")
    results: dict = {s.name: {} for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(n_images, tmp)
        script = tmp / "classify.lua"
        script.write_text(WRK_SCRIPT)
        servers: dict[str, Server | PeerProcess] = {}

        def measure(s: System, c: int, secs: int) -> dict:
            server = servers[s.name]
            if s.pause_when_idle:
                server.resume()
                time.sleep(0.2)  # let its processes get scheduled again before the clock starts
            try:
                degraded = None if s.peer else _degraded(server.url)
                cpu = tree_cpu_seconds(server.proc.pid)
                r = run_wrk(f"{server.url}{s.path}{s.query}", c, secs, script, images, s.body or body)
                r["cpu_cores"] = (tree_cpu_seconds(server.proc.pid) - cpu) / r[
                    "seconds"
                ]  # the server's, all its processes
                if degraded is not None:  # ours: answers capped to the degrade depth under load (less work)
                    r["degraded"] = _degraded(server.url) - degraded
            finally:
                if s.pause_when_idle:
                    server.pause()
            return r

        try:
            for s in list(systems):
                try:
                    servers[s.name] = start(s)
                except RuntimeError as e:  # a peer that cannot run here: said why, measured without it
                    if not s.peer:
                        raise
                    print(f"  {s.name}: not run: {e}", flush=True)
                    results[s.name] = {"error": str(e)[-2000:]}
                    systems.remove(s)
                    continue
                if s.pause_when_idle:
                    servers[s.name].pause()
            for c in concurrencies:
                for s in systems:  # warm every server at this concurrency once, unmeasured
                    measure(s, c, warmup_s)
                runs: dict[str, list[dict]] = {s.name: [] for s in systems}
                for _ in range(repeats):
                    for s in systems:
                        r = measure(s, c, seconds)
                        runs[s.name].append(r)
                        print(
                            f"  c={c:<3} {s.name:<32} {r['rps']:8.1f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  "
                            f"cpu {r['cpu_cores']:4.2f}  non-2xx {r['non2xx']}  errors {r['errors']}",
                            flush=True,
                        )
                for s in systems:
                    rs = runs[s.name]
                    results[s.name][c] = {
                        "rps": statistics.median(r["rps"] for r in rs),
                        "p50_ms": statistics.median(r["p50"] for r in rs),
                        "p95_ms": statistics.median(r["p95"] for r in rs),
                        "p99_ms": statistics.median(r["p99"] for r in rs),
                        "cpu_cores": statistics.median(r["cpu_cores"] for r in rs),
                        "non2xx": sum(r["non2xx"] for r in rs),
                        "errors": sum(r["errors"] for r in rs),
                        "runs": len(rs),
                    }
                    if not s.peer:
                        results[s.name][c]["degraded"] = sum(r.get("degraded", 0) for r in rs)
        finally:
            for server in servers.values():
                server.stop()
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds_per_run": seconds,
        "repeats": repeats,
        "images": n_images,
        "body": body,
        "results": results,
    }


def _degraded(url: str) -> float:
    """Images our service has answered at the degrade depth so far (its Prometheus counter)."""
    samples = metric_samples(httpx.get(url + "/metrics", timeout=10).text)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "puppet_depth_chosen_total" and ("reason", "degraded") in labels
    )


def service_systems(backend: str) -> list[System]:
    """Batching and depth policy compared within one serving process (`--peers` measures the whole service)."""
    extra = {"backend": backend, "workers": "1"}
    return [
        System(f"{backend}: batching, auto depth", {**extra, "max_batch_size": "32"}),
        System(f"{backend}: no batching, auto depth", {**extra, "max_batch_size": "1"}),
        System(f"{backend}: batching, depth 4", {**extra, "max_batch_size": "32"}, query="?depth=4"),
    ]


COMMON = {"degrade_under_load": "false", "max_queue": "4096", "request_deadline_ms": "30000"}


def render(report: dict) -> str:
    res = {name: r for name, r in report["results"].items() if "error" not in r}
    names = list(res)
    concs = sorted({c for r in res.values() for c in r}, key=int)
    lines = [
        "| system | concurrency | req/s | p50 ms | p95 ms | p99 ms | server CPU (cores) | non-2xx | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in concs:
        for n in names:
            r = res[n][c]
            lines.append(
                f"| {n} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r.get('cpu_cores', float('nan')):.2f} | {r['non2xx']} | {r['errors']} |"
            )
    return "\n".join(lines)


def main(args) -> int:
    if args.models:
        report = bench_models(args.checkpoint)
        print(render_models(report))
        out = args.out if args.out != "docs/benchmarks-service.json" else "docs/benchmarks-models.json"
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    systems = [System(s.name, {**COMMON, **s.settings}, s.query) for b in backends for s in service_systems(b)]
    report = bench(systems, args.concurrency, seconds=args.seconds, repeats=args.repeats)
    res = report["results"]
    ratios = {}
    for b in backends:
        for c in args.concurrency:
            batching, none, deep = (
                res[f"{b}: {n}"][c] for n in ("batching, auto depth", "no batching, auto depth", "batching, depth 4")
            )
            ratios[f"{b} c={c}"] = {
                "batching_vs_none_throughput": batching["rps"] / none["rps"],
                "batching_vs_none_p50": batching["p50_ms"] / none["p50_ms"],
                "auto_vs_depth4_throughput": batching["rps"] / deep["rps"],
            }
    if "torch" in backends and "onnx" in backends:
        for c in args.concurrency:
            ratios[f"onnx/torch c={c}"] = {
                "throughput": res["onnx: batching, auto depth"][c]["rps"] / res["torch: batching, auto depth"][c]["rps"]
            }
    report["ratios"] = ratios
    print(render(report))
    for key, r in ratios.items():
        print(key, " ".join(f"{k} {v:.2f}" for k, v in r.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def bench_models(checkpoint: str, *, batches=(1, 8, 32, 128), repeats: int = 7, min_seconds: float = 0.2) -> dict:
    """Model-only latency, torch eager (cached kernels) against onnxruntime, per depth and batch size, one thread.

    The two run alternately inside each repeat so drift cancels; the figure is the median over repeats.
    """
    import tempfile as _tempfile

    import onnxruntime as ort
    import torch

    from model import load_checkpoint
    from model.onnx_export import export_onnx, verified_export

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    ckpt.model.cache_kernels()
    with _tempfile.TemporaryDirectory() as tmp:
        export_onnx(ckpt, tmp)
        files = verified_export(ckpt, tmp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions = {
            d: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for d, p in files.items()
        }
        pre = ckpt.preprocessing
        rows = []
        for d in sorted(sessions):
            for b in batches:
                x = torch.randn(b, pre.channels, pre.image_size, pre.image_size)
                xn = x.numpy()

                def run_torch(x=x, d=d):
                    with torch.inference_mode():
                        ckpt.model(x, d)

                def run_onnx(xn=xn, d=d):
                    sessions[d].run(None, {"input": xn})

                times = {"torch": [], "onnx": []}
                for _ in range(repeats):
                    for name, fn in (("torch", run_torch), ("onnx", run_onnx)):
                        fn()
                        n, t0 = 0, time.perf_counter()
                        while time.perf_counter() - t0 < min_seconds:
                            fn()
                            n += 1
                        times[name].append((time.perf_counter() - t0) / n)
                t_torch, t_onnx = statistics.median(times["torch"]), statistics.median(times["onnx"])
                rows.append(
                    {
                        "depth": d,
                        "batch": b,
                        "torch_ms": t_torch * 1000,
                        "onnx_ms": t_onnx * 1000,
                        "torch_img_s": b / t_torch,
                        "onnx_img_s": b / t_onnx,
                        "speedup": t_torch / t_onnx,
                    }
                )
                print(
                    f"  depth {d} batch {b:<4} torch {t_torch * 1000:8.3f} ms  onnx {t_onnx * 1000:8.3f} ms  onnx/torch {t_torch / t_onnx:5.2f}x",
                    flush=True,
                )
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "threads": 1, "rows": rows}


def render_models(report: dict) -> str:
    lines = [
        "| depth | batch | torch ms | onnxruntime ms | torch img/s | onnxruntime img/s | onnxruntime / torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['depth']} | {r['batch']} | {r['torch_ms']:.3f} | {r['onnx_ms']:.3f} | {r['torch_img_s']:.0f} | {r['onnx_img_s']:.0f} | {r['speedup']:.2f}× |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.service_bench",
        description="bounded wrk load on loopback: batching on/off, auto depth vs max depth; --models",
    )
    p.add_argument(
        "--concurrency", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 8, 32, 64), help="e.g. 1,8,32"
    )
    p.add_argument("--seconds", type=int, default=8, help="length of one measured run")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per system and concurrency")
    p.add_argument("--out", default="docs/benchmarks-service.json")
    p.add_argument("--backends", default="torch", help="service backends to compare, e.g. torch,onnx")
    p.add_argument(
        "--models", action="store_true", help="model only: torch eager vs onnxruntime per depth and batch size"
    )
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="for --models")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
