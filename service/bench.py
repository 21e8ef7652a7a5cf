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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, settings: dict[str, str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **SERVER_ENV, "PUPPET_PORT": str(self.port), "PUPPET_LOG_LEVEL": "warning"}
        env.update({f"PUPPET_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server with {settings} exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"server with {settings} did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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


SERVICE_SYSTEMS = [
    System("batching, auto depth", {"max_batch_size": "32"}),
    System("no batching, auto depth", {"max_batch_size": "1"}),
    System("batching, depth 4", {"max_batch_size": "32"}, query="?depth=4"),
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
    systems = [System(s.name, {**COMMON, **s.settings}, s.query) for s in SERVICE_SYSTEMS]
    report = bench(systems, args.concurrency, seconds=args.seconds, repeats=args.repeats)
    res = report["results"]
    ratios = {}
    for c in args.concurrency:
        b, nb, d4 = res["batching, auto depth"][c], res["no batching, auto depth"][c], res["batching, depth 4"][c]
        ratios[c] = {
            "batching_vs_none_throughput": b["rps"] / nb["rps"],
            "batching_vs_none_p50": b["p50_ms"] / nb["p50_ms"],
            "auto_vs_depth4_throughput": b["rps"] / d4["rps"],
        }
    report["ratios"] = ratios
    print(render(report))
    for c, r in ratios.items():
        print(
            f"c={c}: batching/none throughput {r['batching_vs_none_throughput']:.2f}x, p50 ratio {r['batching_vs_none_p50']:.2f}; auto/depth-4 throughput {r['auto_vs_depth4_throughput']:.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
