"""Evaluation of a trained puppet against its static twin; writes docs/model-report.{md,json} and plots.

Every figure is measured here on the test split, on this machine; nothing is copied from elsewhere.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import Checkpoint, load_checkpoint
from model.complexity import complexity
from model.data import Dataset, load_dataset
from model.train import predict_all_depths

REGRESSION_SLICE = 2000  # the first N test images: the fast regression guard in tests/


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # average the ranks of tied values
        uniq, inverse = torch.unique(x, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def kernel_generation_ms(ckpt: Checkpoint, repeats: int = 20) -> float:
    """Median wall time of generating every depth's kernels once (no grad)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            ckpt.model.generate_kernels()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def accuracy_by_depth(ckpt: Checkpoint, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (D, N, K), correct (N, D))."""
    logits = predict_all_depths(ckpt.model, data.images, ckpt.preprocessing)
    return logits, (logits.argmax(-1) == data.labels).T


def policy_accuracy(ckpt: Checkpoint, data: Dataset) -> dict:
    """Accuracy with complexity-chosen depth, run through the per-sample-depth forward."""
    h = complexity(data.images)
    depths = ckpt.policy.auto(h)
    model, pre = ckpt.model, ckpt.preprocessing
    model.eval()
    model.cache_kernels()
    t0 = time.perf_counter()
    preds = []
    with torch.no_grad():
        for i in range(0, len(data), 500):
            preds.append(model(pre.normalise(data.images[i : i + 500]), depths[i : i + 500]).argmax(-1))
    seconds = time.perf_counter() - t0
    correct = torch.cat(preds) == data.labels
    return {"complexity": h, "depths": depths, "correct": correct, "seconds": seconds}


def evaluate(
    checkpoint: str | Path,
    *,
    twin: str | Path | None = None,
    ablation: tuple[str | Path, str | Path] | None = None,
    data_dir: str | Path | None = None,
    out: str | Path = "docs",
    plots: bool = True,
    random_repeats: int = 100,
) -> dict:
    """Evaluate and write the report. `ablation` is (ODE puppet, tied puppet) trained with one short recipe."""
    t_start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    d_max = ckpt.config.max_depth
    test = load_dataset(ckpt.dataset or "fashion-mnist", "test", Path(data_dir) if data_dir else None)
    logits, correct = accuracy_by_depth(ckpt, test)
    acc_by_depth = correct.float().mean(0).tolist()
    routed = policy_accuracy(ckpt, test)
    h, depths = routed["complexity"], routed["depths"]
    policy_acc = float(routed["correct"].float().mean())
    gathered = correct[torch.arange(len(depths)), depths - 1]
    g = torch.Generator().manual_seed(0)
    random_accs = []
    for _ in range(random_repeats):
        shuffled = depths[torch.randperm(len(depths), generator=g)]
        random_accs.append(float(correct[torch.arange(len(depths)), shuffled - 1].float().mean()))
    oracle = float(correct.any(dim=1).float().mean())
    loss_max = F.cross_entropy(logits[-1], test.labels, reduction="none")
    macs = [ckpt.model.macs(d) for d in range(1, d_max + 1)]
    mean_macs = float(torch.tensor(macs, dtype=torch.float64)[depths - 1].mean())
    n_slice = min(REGRESSION_SLICE, len(test))
    report: dict = {
        "checkpoint": str(checkpoint),
        "sha256": ckpt.sha256,
        "version": ckpt.version,
        "dataset": ckpt.dataset,
        "test_images": len(test),
        "architecture": ckpt.config.to_dict(),
        "recipe": ckpt.recipe,
        "accuracy_by_depth": acc_by_depth,
        "accuracy_policy": policy_acc,
        "policy_matches_gathered": bool((gathered == routed["correct"]).all()),
        "mean_depth": float(depths.float().mean()),
        "depth_share": [float((depths == d).float().mean()) for d in range(1, d_max + 1)],
        "depth_table": ckpt.policy.to_dict(),
        "accuracy_random_same_distribution": {
            "mean": statistics.mean(random_accs),
            "std": statistics.pstdev(random_accs),
        },
        "accuracy_oracle": oracle,
        "spearman_complexity_vs_loss": spearman(h, loss_max),
        "macs_by_depth": macs,
        "macs_policy_mean": mean_macs,
        "stored_parameters": ckpt.model.stored_parameters(),
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
        "kernel_generation_ms": kernel_generation_ms(ckpt),
        "policy_forward_seconds": routed["seconds"],
        "regression_slice": {"images": n_slice, "accuracy_policy": float(routed["correct"][:n_slice].float().mean())},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    if twin:
        t = load_checkpoint(twin)
        _, twin_correct = accuracy_by_depth(t, test)
        report["twin"] = {
            "checkpoint": str(twin),
            "accuracy_max_depth": float(twin_correct[:, -1].float().mean()),
            "stored_parameters": t.model.stored_parameters(),
            "checkpoint_bytes": Path(twin).stat().st_size,
            "recipe": t.recipe,
        }
        report["compression_parameters"] = report["twin"]["stored_parameters"] / report["stored_parameters"]
        report["compression_bytes"] = report["twin"]["checkpoint_bytes"] / report["checkpoint_bytes"]
    if ablation:
        report["ablation"] = {}
        for name, path in zip(("ode", "tied"), ablation, strict=True):
            a = load_checkpoint(path)
            _, a_correct = accuracy_by_depth(a, test)
            report["ablation"][name] = {
                "checkpoint": str(path),
                "accuracy_by_depth": a_correct.float().mean(0).tolist(),
                "stored_parameters": a.model.stored_parameters(),
                "recipe": a.recipe,
            }
    report["evaluation_seconds"] = time.perf_counter() - t_start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-report.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        _plots(report, h, depths, correct, out)
    (out / "model-report.md").write_text(render_markdown(report, plots))
    return report


def _plots(report: dict, h: torch.Tensor, depths: torch.Tensor, correct: torch.Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_max = len(report["accuracy_by_depth"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    mmacs = [m / 1e6 for m in report["macs_by_depth"]]
    ax[0].plot(mmacs, [a * 100 for a in report["accuracy_by_depth"]], "o-", label="puppet, fixed depth 1..D")
    ax[0].plot(
        [report["macs_policy_mean"] / 1e6],
        [report["accuracy_policy"] * 100],
        "r*",
        ms=14,
        label="complexity-chosen depth",
    )
    if "twin" in report:
        ax[0].axhline(report["twin"]["accuracy_max_depth"] * 100, color="gray", ls="--", label="static twin (depth D)")
    ax[0].set_xlabel("MMACs per image")
    ax[0].set_ylabel("test top-1 (%)")
    ax[0].legend()
    ax[0].set_title("accuracy against compute")
    edges = report["depth_table"]["edges"]
    for d in range(1, d_max + 1):
        ax[1].hist(
            h[depths == d].numpy(),
            bins=60,
            range=(float(h.min()), float(h.max())),
            alpha=0.6,
            label=f"routed to depth {d}",
        )
    for e in edges:
        ax[1].axvline(e, color="k", lw=0.5)
    ax[1].set_xlabel("complexity H (bits)")
    ax[1].set_ylabel("test images")
    ax[1].legend()
    ax[1].set_title("complexity and the depth table")
    fig.tight_layout()
    fig.savefig(out / "model-report.png", dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_markdown(r: dict, plots: bool) -> str:
    d_max = len(r["accuracy_by_depth"])
    rec = r["recipe"]
    lines = [
        "# Puppet-CNN model report",
        "",
        f"Written by `puppet-cnn evaluate` for `{r['checkpoint']}` (version `{r['version']}`, sha256 `{r['sha256'][:16]}…`)",
        f"on {r['test_images']:,} {r['dataset']} test images. Machine: {r['machine']['platform']}, "
        f"{r['machine']['torch_threads']} torch thread(s). The whole evaluation took {r['evaluation_seconds']:.1f} s.",
        "",
        "## Accuracy at each depth",
        "",
        "| depth | top-1 | MMACs / image | share routed here |",
        "|---|---|---|---|",
    ]
    for d in range(d_max):
        lines.append(
            f"| {d + 1} | {_pct(r['accuracy_by_depth'][d])} | {r['macs_by_depth'][d] / 1e6:.1f} | {_pct(r['depth_share'][d])} |"
        )
    rnd = r["accuracy_random_same_distribution"]
    lines += [
        f"| **complexity-chosen** | **{_pct(r['accuracy_policy'])}** | **{r['macs_policy_mean'] / 1e6:.1f}** (mean) | mean depth {r['mean_depth']:.2f} of {d_max} |",
        "",
        "## Is the complexity signal worth anything?",
        "",
        f"- Complexity-chosen depth: {_pct(r['accuracy_policy'])} at mean depth {r['mean_depth']:.2f}.",
        f"- A random depth with the same distribution ({len(r['depth_share'])} depths, shares as above, 100 draws): "
        f"{_pct(rnd['mean'])} ± {100 * rnd['std']:.2f} pt.",
        f"- Per-image oracle (correct at some depth): {_pct(r['accuracy_oracle'])}.",
        f"- Always depth {d_max}: {_pct(r['accuracy_by_depth'][-1])}; "
        f"routing costs {100 * (r['accuracy_by_depth'][-1] - r['accuracy_policy']):+.2f} pt for "
        f"{100 * (1 - r['mean_depth'] / d_max):.0f}% fewer blocks.",
        f"- Spearman correlation of complexity H with the per-image loss at depth {d_max}: {r['spearman_complexity_vs_loss']:+.3f}.",
        f"- The routed (per-sample-depth) forward pass agrees with the fixed-depth passes on every image: {r['policy_matches_gathered']}; "
        f"it ran the whole test set in {r['policy_forward_seconds']:.2f} s.",
        "",
        "Depth table (calibrated on the validation split, tolerance "
        f"{100 * r['depth_table']['tolerance']:.1f} pt per bin): edges {[round(e, 3) for e in r['depth_table']['edges']]}, "
        f"depths {list(r['depth_table']['depths'])}.",
        "",
        "## Size: puppet against its static twin",
        "",
    ]
    if "twin" in r:
        t = r["twin"]
        lines += [
            "| model | stored parameters | checkpoint bytes | top-1 at depth " + str(d_max) + " |",
            "|---|---|---|---|",
            f"| Puppet-CNN | {r['stored_parameters']:,} | {r['checkpoint_bytes']:,} | {_pct(r['accuracy_by_depth'][-1])} |",
            f"| static twin | {t['stored_parameters']:,} | {t['checkpoint_bytes']:,} | {_pct(t['accuracy_max_depth'])} |",
            f"| ratio | **{r['compression_parameters']:.2f}×** | **{r['compression_bytes']:.2f}×** | "
            f"{100 * (t['accuracy_max_depth'] - r['accuracy_by_depth'][-1]):+.2f} pt (twin − puppet) |",
            "",
            f"Both trained with one recipe: {rec.get('epochs')} epochs, batch {rec.get('batch_size')}, AdamW lr {rec.get('lr')}, "
            f"warm-up + cosine, translation ±2 px and flips, bf16 autocast={rec.get('bf16')}; the puppet with "
            f"depth sampling `{rec.get('depth_sampling')}`, the twin (a plain CNN) at depth {d_max} only.",
        ]
    else:
        lines.append(
            f"Stored parameters: {r['stored_parameters']:,}; checkpoint bytes: {r['checkpoint_bytes']:,} (no twin given)."
        )
    lines += ["", "## What the ODE contributes", ""]
    if "ablation" in r:
        a = r["ablation"]
        lines += [
            "The puppeteer (dP/dl = G(P)) against tied kernels (G ≡ 0: every layer of a stage uses P_0), "
            "trained with one short recipe of equal budget "
            f"({a['ode']['recipe'].get('epochs')} epochs, {a['ode']['recipe'].get('limit') or 'all'} training images):",
            "",
            "| depth | ODE puppeteer | tied kernels |",
            "|---|---|---|",
        ]
        for d in range(d_max):
            lines.append(
                f"| {d + 1} | {_pct(a['ode']['accuracy_by_depth'][d])} | {_pct(a['tied']['accuracy_by_depth'][d])} |"
            )
        lines.append(f"| stored parameters | {a['ode']['stored_parameters']:,} | {a['tied']['stored_parameters']:,} |")
    else:
        lines.append("Not measured in this run (no ablation checkpoints given).")
    lines += [
        "",
        "## Cost of generating kernels",
        "",
        f"Generating every depth's kernels once takes {r['kernel_generation_ms']:.2f} ms (median of 20, no grad); "
        "the service does it once at start-up and caches them.",
        "",
        f"Regression guard: on the first {r['regression_slice']['images']} test images the complexity-routed accuracy is "
        f"{_pct(r['regression_slice']['accuracy_policy'])} (tests/test_shipped_checkpoint.py checks it within 0.5 pt).",
    ]
    if plots:
        lines += ["", "![accuracy against compute; complexity and the depth table](model-report.png)"]
    return "\n".join(lines) + "\n"
