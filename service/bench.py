"""`puppet-cnn bench`: bounded load on loopback against real servers, side by side, with wrk.

Every configuration runs as its own `puppet-cnn serve` process (started once, idle while the others are
measured); runs alternate configuration by configuration at each concurrency (A B C A B C ...) so drift
on a noisy machine cancels. Requests cycle through real Fashion-MNIST test images.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.server import ServerProcess

# glibc: keep activation buffers mapped between batches instead of zeroing fresh pages (DESIGN.md sec. 6)
SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
    "MALLOC_TOP_PAD_": "67108864",
}

WRK_SCRIPT = """
local bodies = {}
local i = 0
function init(args)
  local folder, n = args[1], tonumber(args[2])
  for k = 0, n - 1 do
    local f = assert(io.open(string.format("%s/%05d.png", folder, k), "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
  end
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", wrk.path, {["Content-Type"] = "image/png"}, bodies[i])
end
function done(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %d, "seconds": %f, "errors": %d, "non2xx": %d, "p50": %f, "p95": %f, "p99": %f}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3))
end
"""


@dataclass
class System:
    """One server configuration (PUPPET_* settings) and the query string its requests carry."""

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    query: str = ""


class Server(ServerProcess):
    def __init__(self, settings: dict[str, str]):
        super().__init__(settings, env=SERVER_ENV)


def write_images(n: int, folder: Path) -> list[Path]:
    from model import load_dataset
    from model.data import encode_png

    data = load_dataset("fashion-mnist", "test").subset(slice(0, n))
    paths = []
    for i, img in enumerate(data.images):
        p = folder / f"{i:05d}.png"
        p.write_bytes(encode_png(img))
        paths.append(p)
    return paths


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, images: list[Path]) -> dict:
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
) -> dict:
    if shutil.which("wrk") is None:
        raise ValueError("wrk is not installed: apt-get install wrk (make bench does it when run as root)")
    results: dict = {s.name: {} for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(n_images, tmp)
        script = tmp / "classify.lua"
        script.write_text(WRK_SCRIPT)
        servers = {}
        try:
            for s in systems:
                servers[s.name] = Server(s.settings)
            for c in concurrencies:
                for s in systems:  # warm every server at this concurrency once, unmeasured
                    run_wrk(f"{servers[s.name].url}/classify{s.query}", c, warmup_s, script, images)
                runs: dict[str, list[dict]] = {s.name: [] for s in systems}
                for _ in range(repeats):
                    for s in systems:
                        r = run_wrk(f"{servers[s.name].url}/classify{s.query}", c, seconds, script, images)
                        runs[s.name].append(r)
                        print(
                            f"  c={c:<3} {s.name:<24} {r['rps']:8.1f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  non-2xx {r['non2xx']}",
                            flush=True,
                        )
                for s in systems:
                    rs = runs[s.name]
                    results[s.name][c] = {
                        "rps": statistics.median(r["rps"] for r in rs),
                        "p50_ms": statistics.median(r["p50"] for r in rs),
                        "p95_ms": statistics.median(r["p95"] for r in rs),
                        "p99_ms": statistics.median(r["p99"] for r in rs),
                        "non2xx": sum(r["non2xx"] for r in rs),
                        "errors": sum(r["errors"] for r in rs),
                        "runs": len(rs),
                    }
        finally:
            for server in servers.values():
                server.stop()
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds_per_run": seconds,
        "repeats": repeats,
        "images": n_images,
        "results": results,
    }


def service_systems(backend: str) -> list[System]:
    extra = {"backend": backend}
    return [
        System(f"{backend}: batching, auto depth", {**extra, "max_batch_size": "32"}),
        System(f"{backend}: no batching, auto depth", {**extra, "max_batch_size": "1"}),
        System(f"{backend}: batching, depth 4", {**extra, "max_batch_size": "32"}, query="?depth=4"),
    ]


COMMON = {"degrade_under_load": "false", "max_queue": "4096", "request_deadline_ms": "30000"}


def render(report: dict) -> str:
    res = report["results"]
    names = list(res)
    concs = sorted({c for r in res.values() for c in r}, key=int)
    lines = [
        "| system | concurrency | req/s | p50 ms | p95 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in concs:
        for n in names:
            r = res[n][c]
            lines.append(
                f"| {n} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['non2xx']} |"
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
