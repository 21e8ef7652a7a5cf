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
    test = load_dataset(ckpt.dataset or "fashion-mnist", "test", Path(data_dir) if data_dir else None)
    logits, correct = accuracy_by_depth(ckpt, test)
    routed = policy_accuracy(ckpt, test)
    report: dict = {  # the sections in the order model-report.json lists them
        **_identity(checkpoint, ckpt, len(test)),
        **_routing(ckpt, test, logits, correct, routed, random_repeats),
        **_cost(checkpoint, ckpt, routed),
        "regression_slice": _regression_slice(routed["correct"]),
        "machine": _machine(),
    }
    if twin:
        report.update(_against_twin(twin, test, report))
    if ablation:
        report["ablation"] = _ablation(ablation, test)
    report["evaluation_seconds"] = time.perf_counter() - t_start
    _write(report, Path(out), plots, routed["complexity"], routed["depths"], correct)
    return report


def _identity(checkpoint: str | Path, ckpt: Checkpoint, test_images: int) -> dict:
    """Which model was evaluated, on how many images, and how it was built and trained."""
    return {
        "checkpoint": str(checkpoint),
        "sha256": ckpt.sha256,
        "version": ckpt.version,
        "dataset": ckpt.dataset,
        "test_images": test_images,
        "architecture": ckpt.config.to_dict(),
        "recipe": ckpt.recipe,
    }


def _routing(
    ckpt: Checkpoint, test: Dataset, logits: torch.Tensor, correct: torch.Tensor, routed: dict, random_repeats: int
) -> dict:
    """Accuracy at each depth and with complexity-chosen depth, against a random depth and the per-image oracle."""
    d_max = ckpt.config.max_depth
    h, depths = routed["complexity"], routed["depths"]
    gathered = correct[torch.arange(len(depths)), depths - 1]
    random_accs = _random_depth_accuracies(correct, depths, random_repeats)
    loss_max = F.cross_entropy(logits[-1], test.labels, reduction="none")
    return {
        "accuracy_by_depth": correct.float().mean(0).tolist(),
        "accuracy_policy": float(routed["correct"].float().mean()),
        "policy_matches_gathered": bool((gathered == routed["correct"]).all()),
        "mean_depth": float(depths.float().mean()),
        "depth_share": [float((depths == d).float().mean()) for d in range(1, d_max + 1)],
        "depth_table": ckpt.policy.to_dict(),
        "accuracy_random_same_distribution": {
            "mean": statistics.mean(random_accs),
            "std": statistics.pstdev(random_accs),
        },
        "accuracy_oracle": float(correct.any(dim=1).float().mean()),
        "spearman_complexity_vs_loss": spearman(h, loss_max),
    }


def _random_depth_accuracies(correct: torch.Tensor, depths: torch.Tensor, repeats: int) -> list[float]:
    """Accuracy when the chosen depths are shuffled across images: same depth distribution, no signal (seeded)."""
    g = torch.Generator().manual_seed(0)
    accs = []
    for _ in range(repeats):
        shuffled = depths[torch.randperm(len(depths), generator=g)]
        accs.append(float(correct[torch.arange(len(depths)), shuffled - 1].float().mean()))
    return accs


def _cost(checkpoint: str | Path, ckpt: Checkpoint, routed: dict) -> dict:
    """Compute per image, size on disk and in parameters, and the time kernels and the routed pass take."""
    macs = [ckpt.model.macs(d) for d in range(1, ckpt.config.max_depth + 1)]
    return {
        "macs_by_depth": macs,
        "macs_policy_mean": float(torch.tensor(macs, dtype=torch.float64)[routed["depths"] - 1].mean()),
        "stored_parameters": ckpt.model.stored_parameters(),
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
        "kernel_generation_ms": kernel_generation_ms(ckpt),
        "policy_forward_seconds": routed["seconds"],
    }


def _regression_slice(routed_correct: torch.Tensor) -> dict:
    """Routed accuracy on the first test images, which tests/test_shipped_checkpoint.py re-measures quickly."""
    n_slice = min(REGRESSION_SLICE, len(routed_correct))
    return {"images": n_slice, "accuracy_policy": float(routed_correct[:n_slice].float().mean())}


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
    }


def _against_twin(twin: str | Path, test: Dataset, report: dict) -> dict:
    """The static twin's accuracy and size, and how many times smaller the puppet is."""
    t = load_checkpoint(twin)
    _, twin_correct = accuracy_by_depth(t, test)
    entry = {
        "checkpoint": str(twin),
        "accuracy_max_depth": float(twin_correct[:, -1].float().mean()),
        "stored_parameters": t.model.stored_parameters(),
        "checkpoint_bytes": Path(twin).stat().st_size,
        "recipe": t.recipe,
    }
    return {
        "twin": entry,
        "compression_parameters": entry["stored_parameters"] / report["stored_parameters"],
        "compression_bytes": entry["checkpoint_bytes"] / report["checkpoint_bytes"],
    }


def _ablation(ablation: tuple[str | Path, str | Path], test: Dataset) -> dict:
    """Accuracy at each depth of the equal-budget ODE and tied-kernel checkpoints."""
    result = {}
    for name, path in zip(("ode", "tied"), ablation, strict=True):
        a = load_checkpoint(path)
        _, a_correct = accuracy_by_depth(a, test)
        result[name] = {
            "checkpoint": str(path),
            "accuracy_by_depth": a_correct.float().mean(0).tolist(),
            "stored_parameters": a.model.stored_parameters(),
            "recipe": a.recipe,
        }
    return result


def _write(report: dict, out: Path, plots: bool, h: torch.Tensor, depths: torch.Tensor, correct: torch.Tensor) -> None:
    """model-report.json, the plots (optional: they need matplotlib) and model-report.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-report.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        _plots(report, h, depths, correct, out)
    (out / "model-report.md").write_text(render_markdown(report, plots))


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
    """docs/model-report.md from the report `evaluate` measured, one section after another."""
    sections = [_md_intro(r), _md_accuracy(r), _md_routing(r), _md_size(r), _md_ablation(r), _md_kernels(r)]
    if plots:
        sections.append(["![accuracy against compute; complexity and the depth table](model-report.png)"])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _md_intro(r: dict) -> list[str]:
    return [
        "# Puppet-CNN model report",
        "",
        f"Written by `puppet-cnn evaluate` for `{r['checkpoint']}` (version `{r['version']}`, sha256 `{r['sha256'][:16]}…`)",
        f"on {r['test_images']:,} {r['dataset']} test images. Machine: {r['machine']['platform']}, "
        f"{r['machine']['torch_threads']} torch thread(s). The whole evaluation took {r['evaluation_seconds']:.1f} s.",
    ]


def _md_accuracy(r: dict) -> list[str]:
    d_max = len(r["accuracy_by_depth"])
    lines = [
        "## Accuracy at each depth",
        "",
        "| depth | top-1 | MMACs / image | share routed here |",
        "|---|---|---|---|",
    ]
    for d in range(d_max):
        lines.append(
            f"| {d + 1} | {_pct(r['accuracy_by_depth'][d])} | {r['macs_by_depth'][d] / 1e6:.1f} | {_pct(r['depth_share'][d])} |"
        )
    lines.append(
        f"| **complexity-chosen** | **{_pct(r['accuracy_policy'])}** | **{r['macs_policy_mean'] / 1e6:.1f}** (mean) | mean depth {r['mean_depth']:.2f} of {d_max} |"
    )
    return lines


def _md_routing(r: dict) -> list[str]:
    d_max = len(r["accuracy_by_depth"])
    rnd = r["accuracy_random_same_distribution"]
    return [
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
    ]


def _md_size(r: dict) -> list[str]:
    lines = ["## Size: puppet against its static twin", ""]
    if "twin" not in r:
        return [
            *lines,
            f"Stored parameters: {r['stored_parameters']:,}; checkpoint bytes: {r['checkpoint_bytes']:,} (no twin given).",
        ]
    d_max = len(r["accuracy_by_depth"])
    rec, t = r["recipe"], r["twin"]
    return [
        *lines,
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


def _md_ablation(r: dict) -> list[str]:
    lines = ["## What the ODE contributes", ""]
    if "ablation" not in r:
        return [*lines, "Not measured in this run (no ablation checkpoints given)."]
    a = r["ablation"]
    lines += [
        "The puppeteer (dP/dl = G(P)) against tied kernels (G ≡ 0: every layer of a stage uses P_0), "
        "trained with one short recipe of equal budget "
        f"({a['ode']['recipe'].get('epochs')} epochs, {a['ode']['recipe'].get('limit') or 'all'} training images):",
        "",
        "| depth | ODE puppeteer | tied kernels |",
        "|---|---|---|",
    ]
    for d in range(len(r["accuracy_by_depth"])):
        lines.append(
            f"| {d + 1} | {_pct(a['ode']['accuracy_by_depth'][d])} | {_pct(a['tied']['accuracy_by_depth'][d])} |"
        )
    lines.append(f"| stored parameters | {a['ode']['stored_parameters']:,} | {a['tied']['stored_parameters']:,} |")
    return lines


def _md_kernels(r: dict) -> list[str]:
    return [
        "## Cost of generating kernels",
        "",
        f"Generating every depth's kernels once takes {r['kernel_generation_ms']:.2f} ms (median of 20, no grad); "
        "the service does it once at start-up and caches them.",
        "",
        f"Regression guard: on the first {r['regression_slice']['images']} test images the complexity-routed accuracy is "
        f"{_pct(r['regression_slice']['accuracy_policy'])} (tests/test_shipped_checkpoint.py checks it within 0.5 pt).",
    ]
