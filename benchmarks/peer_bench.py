"""`python -m benchmarks.peer_bench` (`make bench-peers`): our service against the serving systems a team would
shortlist, serving the same model through the same code, under one load.

Every peer (benchmarks/peers/) runs in its own environment, `.venv-peers/<name>` (`make bench-env`), never in the
service's; the model code comes from this source tree. Each serves the shipped checkpoint through the service's
own backend classes (`benchmarks/peers/common.py`: onnxruntime, one graph per depth, exported once here; or
torch), decoding, complexity and depth table included, with the batching its documentation recommends. The load
is the one of `make bench` (benchmarks/service_bench.py): wrk on loopback, the same real test images in the same
JSON body ({"image": base64}; Triton's own protocol carries the same base64 PNG as a BYTES input), systems
alternating run by run at each concurrency, medians of `--repeats` runs; server CPU is the CPU time of a
system's whole process tree over the run's wall time.

Ours runs with no setting at all (its defaults: the onnx backend on the CPU, one worker process per core), and
once more with `PUPPET_BACKEND=torch` beside LitServe on torch, for the torch comparison. A plain FastAPI
endpoint (the model per request) and an HTTP ceiling (decode, constant answer, no model) bound the picture.
A peer that cannot start here is reported with its error and the others are measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks.server_process import SERVER_ENV
from benchmarks.service_bench import REPO, System, bench, render
from model import SHIPPED_CHECKPOINT, load_checkpoint
from model.onnx_export import export_onnx

OURS, OURS_TORCH = "ours: defaults (onnx)", "ours: torch"
TRITON = "triton (pytriton): dynamic batcher"
RAY = "ray serve: @serve.batch"
BENTOML = "bentoml: adaptive batching"
KSERVE = "kserve: ModelServer"
LITSERVE, LITSERVE_TORCH = "litserve: batching", "litserve: batching, torch"
PLAIN, CEILING = "plain fastapi: per request", "ceiling: decode, constant"
PEERS = (TRITON, RAY, BENTOML, KSERVE, LITSERVE)  # the onnx peers: "the best peer" is the fastest of these


def _venv_python(name: str) -> str:
    return str(REPO / ".venv-peers" / name / "bin" / "python")


def peer_systems(onnx_dir: Path) -> list[System]:
    """Ours, then the peers, each configured as its own documentation advises for this 2-core machine (the
    settings and their sources are in docs/benchmarks.md)."""
    onnx = ["--backend", "onnx", "--onnx-dir", str(onnx_dir)]
    torch = ["--backend", "torch"]
    litserve = ["benchmarks.peers.litserve_server", "--max-batch-size", "32", "--batch-timeout-ms", "0"]
    return [
        System(OURS, {}),
        System(OURS_TORCH, {"backend": "torch"}),
        System(
            TRITON,
            peer=["benchmarks.peers.triton_server", *onnx],
            python=_venv_python("triton"),
            path="/v2/models/puppet/infer",
            body="triton",
            health="/v2/health/ready",
        ),
        System(RAY, peer=["benchmarks.peers.ray_serve_server", *onnx], python=_venv_python("ray")),
        System(
            BENTOML,
            peer=["benchmarks.peers.bentoml_server", *onnx],
            python=_venv_python("bentoml"),
            body="bentoml",  # {"images": [base64]}: a batchable endpoint's one list parameter
            health="/readyz",
        ),
        System(
            KSERVE,
            peer=["benchmarks.peers.kserve_server", *onnx],
            python=_venv_python("kserve"),
            path="/v1/models/puppet:predict",  # KServe's v1 protocol hands the JSON body to predict as it is
            health="/v1/models/puppet",
        ),
        # its batch loop polls the request queue nonstop, even with nothing to do: paused while others run
        System(
            LITSERVE,
            peer=[*litserve, "--workers", "2", *onnx],
            python=_venv_python("litserve"),
            pause_when_idle=True,
        ),
        System(
            LITSERVE_TORCH,
            peer=[*litserve, "--workers", "2", *torch],
            python=_venv_python("litserve"),
            pause_when_idle=True,
        ),
        System(PLAIN, peer=["benchmarks.peers.plain_fastapi", *onnx]),
        System(CEILING, peer=["benchmarks.peers.ceiling"]),
    ]


TARGETS = {  # issue 13, on this 2-core CPU
    "vs_best_peer_throughput": (32, ">=", 1.5),
    "vs_best_peer_p99": (32, "<=", 1.0),
    "vs_plain_p50": (1, "<=", 1.0),
    "vs_ceiling_throughput": (32, ">=", 0.6),
}
LABELS = {
    "vs_best_peer_throughput": "ours / best peer, throughput (target ≥ 1.5 at c=32)",
    "vs_best_peer_p99": "ours / best peer, p99 (target ≤ 1 at c=32)",
    "vs_plain_p50": "ours / plain FastAPI, p50 (target ≤ 1 at c=1)",
    "vs_ceiling_throughput": "ours / ceiling, throughput (target ≥ 0.6 at c=32)",
    "torch_vs_litserve_throughput": "ours on torch / LitServe on torch, throughput",
}


def ratios(results: dict, concurrencies: list[int]) -> dict:
    """Per concurrency: ours against the best peer there (the fastest onnx peer), the plain endpoint, the
    ceiling; and the torch pair."""
    out = {}
    ok = {name: r for name, r in results.items() if "error" not in r}

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    for c in concurrencies:
        ours = ok[OURS][c]
        peers = [name for name in PEERS if name in ok]
        row: dict = {}
        if peers:
            best = max(peers, key=lambda name: ok[name][c]["rps"])
            row |= {
                "best_peer": best,
                "vs_best_peer_throughput": ratio(ours["rps"], ok[best][c]["rps"]),
                "vs_best_peer_p99": ratio(ours["p99_ms"], ok[best][c]["p99_ms"]),
            }
        if PLAIN in ok:
            row["vs_plain_p50"] = ratio(ours["p50_ms"], ok[PLAIN][c]["p50_ms"])
        if CEILING in ok:
            row["vs_ceiling_throughput"] = ratio(ours["rps"], ok[CEILING][c]["rps"])
        if OURS_TORCH in ok and LITSERVE_TORCH in ok:
            row["torch_vs_litserve_throughput"] = ratio(ok[OURS_TORCH][c]["rps"], ok[LITSERVE_TORCH][c]["rps"])
        out[c] = row
    return out


def targets(rows: dict) -> dict:
    out = {}
    for key, (c, op, bound) in TARGETS.items():
        value = rows.get(c, {}).get(key)
        if value is not None:
            out[key] = {
                "concurrency": c,
                "ratio": value,
                "target": f"{op} {bound}",
                "met": value >= bound if op == ">=" else value <= bound,
            }
    return out


def render_ratios(rows: dict) -> str:
    concs = sorted(rows)
    lines = ["| | " + " | ".join(f"c={c}" for c in concs) + " |", "|---" * (len(concs) + 1) + "|"]
    lines.append("| best peer | " + " | ".join(rows[c].get("best_peer", "—") for c in concs) + " |")
    for key, label in LABELS.items():
        cells = [f"{rows[c][key]:.2f}" if rows[c].get(key) is not None else "—" for c in concs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Throughput against p99 per system, one point per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, by_c in report["results"].items():
        if "error" in by_c:
            continue
        cs = sorted(by_c, key=int)
        xs, ys = [by_c[c]["p99_ms"] for c in cs], [by_c[c]["rps"] for c in cs]
        style = "o-" if name.startswith("ours") else "s--" if name in (PLAIN, CEILING) else "^-"
        ax.plot(xs, ys, style, label=name, linewidth=2.5 if name == OURS else 1.2)
        for c, x, y in zip(cs, xs, ys, strict=True):
            ax.annotate(f"c={c}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency (ms, log)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(f"Same model, same load: {report['machine']['cpus']} CPU cores, medians of {report['repeats']} runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_bench", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=int, default=8, help="length of one measured run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per system and concurrency")
    p.add_argument("--only", default=None, help="comma-separated system names (substrings) to run")
    p.add_argument("--out", default="docs/benchmarks-peers.json")
    p.add_argument("--plot", default="docs/benchmarks-peers.png")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp) / "onnx"
        export_onnx(load_checkpoint(SHIPPED_CHECKPOINT), onnx_dir)  # once, for every onnx peer
        systems = peer_systems(onnx_dir)
        if args.only:
            wanted = [w.strip() for w in args.only.split(",")]
            systems = [s for s in systems if s.name == OURS or any(w in s.name for w in wanted)]
        missing = {s.name: s.python for s in systems if s.python and not Path(s.python).exists()}
        for name, python in missing.items():
            print(f"  {name}: not run: its environment is missing ({python}): run `make bench-env`", file=sys.stderr)
        runnable = [s for s in systems if s.name not in missing]
        report = bench(runnable, args.concurrency, seconds=args.seconds, repeats=args.repeats, body="json")
        for name, python in missing.items():
            report["results"][name] = {"error": f"environment missing: {python}"}
    report["concurrencies"] = args.concurrency
    report["systems"] = {
        s.name: {"settings": {f"PUPPET_{k.upper()}": v for k, v in s.settings.items()}}
        if not s.peer
        else {
            "peer": s.peer[0],
            "arguments": s.peer[1:],
            "environment": s.python,
            "path": s.path,
            "body": s.body or "json",
        }
        for s in systems
    }
    report["server_env"] = SERVER_ENV
    report["machine"]["processor"] = platform.processor()
    report["ratios"] = ratios(report["results"], args.concurrency)
    report["targets"] = targets(report["ratios"])
    print(render(report))
    print()
    print(render_ratios(report["ratios"]))
    for key, t in report["targets"].items():
        print(
            f"target {key} at c={t['concurrency']}: {t['ratio']:.2f} {t['target']}: {'met' if t['met'] else 'missed'}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
