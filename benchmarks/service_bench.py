"""`python -m benchmarks.service_bench` (`make bench`, `make bench-peers`): bounded load on loopback against real servers, side by side, with wrk.

Every configuration runs as its own `puppet-cnn serve` process (started once, idle while the others are
measured); runs alternate configuration by configuration at each concurrency (A B C A B C ...) so drift
on a noisy machine cancels. Requests cycle through real Fashion-MNIST test images.

`--peers` puts the service (best and default configuration) beside peer servers that serve the same
checkpoint (benchmarks/peers/: LitServe with its batching, a plain FastAPI endpoint, an HTTP ceiling), all
with the same JSON body {"image": "<base64 png>"}. The peers run from .venv-bench (make bench-env); nothing
here imports them.
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

from benchmarks.server_process import SERVER_ENV, ServerProcess, free_port, metric_samples, wait_ready
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


# Request bodies: the raw PNG, or JSON {"image": "<base64 png>"} (what every peer accepts too).
BODIES = {"png": ("png", "image/png"), "json": ("json", "application/json")}


@dataclass
class System:
    """One server: our service with PUPPET_* settings, or a peer (`peer` = module and arguments, run with
    `python -m` from the repository root, given `--port`), and the query string its requests carry.

    `pause_when_idle`: stop the peer's processes (SIGSTOP) while the others are measured, for a peer that
    burns CPU when idle (LitServe's batch loop polls its queue without sleeping when batch_timeout is 0).
    """

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    query: str = ""
    peer: list[str] | None = None
    pause_when_idle: bool = False


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

    def __init__(self, peer: list[str], *, env: dict[str, str], timeout: float = 180.0):
        if not (REPO / "benchmarks" / "peers").is_dir():
            raise ValueError(f"the peer servers are not here: {REPO / 'benchmarks' / 'peers'} (a source checkout)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *peer, "--port", str(self.port)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        if wait_ready(self.url + "/health", timeout, running=lambda: self.proc.poll() is None):
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
    return PeerProcess(s.peer, env=SERVER_ENV) if s.peer else Server(s.settings)


def write_images(n: int, folder: Path) -> list[Path]:
    """n test images as PNG files, and beside each the same image as a JSON body {"image": base64}."""
    from model import load_dataset
    from model.data import encode_png

    data = load_dataset("fashion-mnist", "test").subset(slice(0, n))
    paths = []
    for i, img in enumerate(data.images):
        p = folder / f"{i:05d}.png"
        png = encode_png(img)
        p.write_bytes(png)
        p.with_suffix(".json").write_text(json.dumps({"image": base64.b64encode(png).decode("ascii")}))
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
                r = run_wrk(f"{server.url}/classify{s.query}", c, secs, script, images, body)
                if degraded is not None:  # ours: answers capped to the degrade depth under load (less work)
                    r["degraded"] = _degraded(server.url) - degraded
            finally:
                if s.pause_when_idle:
                    server.pause()
            return r

        try:
            for s in systems:
                servers[s.name] = start(s)
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
                            f"  c={c:<3} {s.name:<24} {r['rps']:8.1f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  non-2xx {r['non2xx']}  errors {r['errors']}",
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
    res = report["results"]
    names = list(res)
    concs = sorted({c for r in res.values() for c in r}, key=int)
    lines = [
        "| system | concurrency | req/s | p50 ms | p95 ms | p99 ms | non-2xx | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in concs:
        for n in names:
            r = res[n][c]
            lines.append(
                f"| {n} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['non2xx']} | {r['errors']} |"
            )
    if "peer_ratios" in report:
        lines += ["", render_peer_ratios(report)]
    return "\n".join(lines)


# -- ours against peers (--peers) ------------------------------------------------------------------------

BEST, DEFAULT = "ours: onnx, batching (best)", "ours: defaults (torch)"
LITSERVE, LITSERVE2 = "litserve: batching", "litserve: batching, 2 workers"
PLAIN, CEILING = "plain fastapi: per request", "ceiling: decode, constant"
# issue 6, at concurrency 32 on the 2-core CPU
PEER_TARGETS = {
    "vs_litserve_throughput": 1.5,
    "vs_litserve_p99": 1.0,
    "vs_plain_throughput": 3.0,
    "vs_ceiling_throughput": 0.6,
}
PEER_RATIO_LABELS = {
    "vs_litserve_throughput": "/ LitServe, throughput (target ≥ 1.5× at c=32)",
    "vs_litserve_p99": "/ LitServe, p99 (target ≤ 1 at c=32)",
    "vs_plain_throughput": "/ plain FastAPI, throughput (target ≥ 3× at c=32)",
    "vs_ceiling_throughput": "/ ceiling, throughput (target ≥ 0.6 at c=32)",
}


def peer_systems(*, max_batch_size: int = 32, litserve_batch_timeout_ms: float = 0.0) -> list[System]:
    """Ours twice, then the peers; every system gets the same JSON body.

    Best: the onnx backend with batching, the fastest configuration in docs/benchmarks.md at every
    concurrency, and degrade-under-load off so that every answer does the same work as the peers' (the
    measured `onnx: batching, auto depth` system of `make bench`). Default: no PUPPET_* setting at all.
    Both run one worker process per core (PUPPET_WORKERS=0, auto), so LitServe runs twice: with its default
    single inference worker, and with one per core (workers_per_device=2); ours is compared with the faster.
    """
    litserve = [
        "benchmarks.peers.litserve_server",
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout-ms",
        str(litserve_batch_timeout_ms),
    ]
    return [
        System(BEST, {**COMMON, "backend": "onnx", "max_batch_size": str(max_batch_size)}),
        System(DEFAULT, {}),
        # its batch loop polls the request queue nonstop, even with nothing to do: paused while others run
        System(LITSERVE, peer=litserve, pause_when_idle=True),
        System(LITSERVE2, peer=[*litserve, "--workers", "2"], pause_when_idle=True),
        System(PLAIN, peer=["benchmarks.peers.plain_fastapi"]),
        System(CEILING, peer=["benchmarks.peers.ceiling"]),
    ]


def peer_ratios(results: dict, concurrencies: list[int]) -> dict:
    ratios = {}
    for ours in (BEST, DEFAULT):
        for c in concurrencies:
            o, plain, ceiling = (results[n][c] for n in (ours, PLAIN, CEILING))
            ls_name = max((n for n in (LITSERVE, LITSERVE2) if n in results), key=lambda n: results[n][c]["rps"])
            ls = results[ls_name][c]  # the faster LitServe configuration at this concurrency
            ratios[f"{ours} c={c}"] = {
                "litserve_compared": ls_name,
                "vs_litserve_throughput": o["rps"] / ls["rps"] if ls["rps"] else None,
                "vs_litserve_p99": o["p99_ms"] / ls["p99_ms"] if ls["p99_ms"] else None,
                "vs_plain_throughput": o["rps"] / plain["rps"] if plain["rps"] else None,
                "vs_ceiling_throughput": o["rps"] / ceiling["rps"] if ceiling["rps"] else None,
            }
    return ratios


def peer_targets(ratios: dict, concurrency: int = 32) -> dict:
    """Whether each configuration meets the issue's targets at concurrency 32 (absent if 32 was not run)."""
    out = {}
    for ours in (BEST, DEFAULT):
        r = ratios.get(f"{ours} c={concurrency}")
        if r is None:
            continue
        out[ours] = {
            k: {
                "ratio": r[k],
                "target": t,
                "met": r[k] is not None and (r[k] <= t if k == "vs_litserve_p99" else r[k] >= t),
            }
            for k, t in PEER_TARGETS.items()
        }
    return out


def render_peer_ratios(report: dict) -> str:
    ratios = report["peer_ratios"]
    concs = report["concurrencies"]
    lines = ["| | " + " | ".join(f"c={c}" for c in concs) + " |", "|---" * (len(concs) + 1) + "|"]
    for ours in (BEST, DEFAULT):
        for key, label in PEER_RATIO_LABELS.items():
            cells = []
            for c in concs:
                v = ratios[f"{ours} c={c}"][key]
                cells.append("—" if v is None else f"{v:.2f}")
            lines.append(f"| {ours} {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("litserve", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "torch", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main_peers(args) -> int:
    import importlib.util

    if importlib.util.find_spec("litserve") is None:
        raise ValueError(
            "litserve is not installed in this environment: run `make bench-env`, then "
            "`.venv-bench/bin/python -m benchmarks.service_bench --peers` (or `make bench-peers`)"
        )
    systems = peer_systems(litserve_batch_timeout_ms=args.litserve_batch_timeout_ms)
    report = bench(systems, args.concurrency, seconds=args.seconds, repeats=args.repeats, body="json")
    report["concurrencies"] = list(args.concurrency)
    report["systems"] = {
        s.name: {"settings": {f"PUPPET_{k.upper()}": v for k, v in s.settings.items()}}
        if not s.peer
        else {"peer": s.peer, "paused_while_others_run": s.pause_when_idle}
        for s in systems
    }
    report["litserve"] = {
        "max_batch_size": 32,
        "batch_timeout_s": args.litserve_batch_timeout_ms / 1000,
        "accelerator": "cpu",
        "workers_per_device": [1, 2],
        "num_api_servers": "LitServe's default",
        "fast_queue": False,
        "torch_threads": 1,
    }
    report["versions"] = _versions()
    report["server_env"] = SERVER_ENV
    report["peer_ratios"] = peer_ratios(report["results"], list(args.concurrency))
    report["peer_targets"] = peer_targets(report["peer_ratios"])
    print(render(report))
    for ours, checks in report["peer_targets"].items():
        print(
            f"c=32 {ours}: "
            + ", ".join(
                f"{k} {v['ratio']:.2f} ({'met' if v['met'] else 'missed'})"
                for k, v in checks.items()
                if v["ratio"] is not None
            )
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def main(args) -> int:
    if getattr(args, "peers", False):
        if args.out == "docs/benchmarks-service.json":
            args.out = "docs/benchmarks-peers.json"
        return main_peers(args)
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
        description="bounded wrk load on loopback: batching on/off, auto depth vs max depth; --models, --peers",
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
    p.add_argument(
        "--peers",
        action="store_true",
        help="ours (best and default configuration) against LitServe, a plain FastAPI endpoint and an HTTP ceiling "
        "(run from .venv-bench: make bench-env); writes docs/benchmarks-peers.json unless --out is given",
    )
    p.add_argument(
        "--litserve-batch-timeout-ms",
        type=float,
        default=0.0,
        help="for --peers: LitServe's batch_timeout (0, as our PUPPET_MAX_QUEUE_DELAY_MS default: never wait)",
    )
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
