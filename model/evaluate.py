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

from model.checkpoint import Checkpoint, load_checkpoint
from model.data import Dataset, load_dataset
from model.predict import predict_all_depths
from model.report_render import plot, render_markdown
from model.router_fit import SplitOutputs, simulate
from model.routers import DifficultyNet
from model.routing_report import evaluate_routers, routed_forward, targets

REGRESSION_SLICE = 2000  # the first N test images: the fast regression guard in tests/


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


def evaluate(
    checkpoint: str | Path,
    *,
    twin: str | Path | None = None,
    ablation: dict[str, list[str | Path]] | None = None,
    data_dir: str | Path | None = None,
    out: str | Path = "docs",
    plots: bool = True,
    random_repeats: int = 100,
    test_limit: int | None = None,
) -> dict:
    """Evaluate and write the report. `ablation` maps "ode", "tied" (puppets of equal stored numbers, one
    checkpoint a seed) and "plain" (a plain CNN of the puppet's stored numbers) to their checkpoints.
    `test_limit` evaluates on the first N test images only, for a quick look; the report says how many."""
    t_start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    test = load_dataset(ckpt.dataset or "fashion-mnist", "test", Path(data_dir) if data_dir else None)
    if test_limit is not None:
        test = test.subset(slice(0, test_limit))
    split = SplitOutputs.of(ckpt, test)
    routed = routed_forward(ckpt, test.images, ckpt.catalog.router())
    report: dict = {  # the sections in the order model-report.json lists them
        **_identity(checkpoint, ckpt, len(test)),
        **_routing(ckpt, split, routed, random_repeats),
        **_cost(checkpoint, ckpt, routed),
        "regression_slice": _regression_slice(routed["probabilities"].argmax(-1) == test.labels),
        "machine": _machine(),
    }
    if twin:
        report.update(_against_twin(twin, test, report))
    if ablation:
        report["ablation"] = _ablation(ablation, test)
    report["targets"] = targets(report)
    report["evaluation_seconds"] = time.perf_counter() - t_start
    _write(report, Path(out), plots)
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
        "trained_on": ckpt.metrics.get("trained_on", "not recorded"),
    }


def _routing(ckpt: Checkpoint, split: SplitOutputs, routed: dict, random_repeats: int) -> dict:
    """Accuracy at each depth; every router against the fixed-depth curve; the served default router run through
    the per-sample-depth forward, which must agree with the figures gathered from the fixed-depth passes."""
    d_max = ckpt.config.max_depth
    correct = routed["probabilities"].argmax(-1) == split.labels
    gathered = simulate(ckpt.catalog.router(), split)
    return {
        "accuracy_by_depth": split.correct.float().mean(0).tolist(),
        "accuracy_routed": float(correct.float().mean()),
        "routed_matches_gathered": bool((gathered["correct"] == correct).all())
        and bool((gathered["final"] == routed["final"]).all()),
        "mean_depth": float(routed["final"].float().mean()),
        "depth_share": [float((routed["final"] == d).float().mean()) for d in range(1, d_max + 1)],
        "depth_table": ckpt.policy.to_dict(),
        "routing": evaluate_routers(ckpt.catalog, split, random_repeats),
    }


def _cost(checkpoint: str | Path, ckpt: Checkpoint, routed: dict) -> dict:
    """Compute per image, size on disk and in stored numbers, and the time kernels and the routed pass take."""
    macs = [ckpt.model.macs(d) for d in range(1, ckpt.config.max_depth + 1)]
    net = ckpt.catalog.net
    router_numbers = DifficultyNet.from_dict(net).stored_numbers() if net else 0
    return {
        "macs_by_depth": macs,
        "stored_parameters": ckpt.model.stored_parameters(),
        "stored_numbers": ckpt.model.stored_numbers(),
        "stored_numbers_with_routers": ckpt.model.stored_numbers() + router_numbers,
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
        "kernel_generation_ms": kernel_generation_ms(ckpt),
        "routed_forward_seconds": routed["seconds"],
    }


def _regression_slice(routed_correct: torch.Tensor) -> dict:
    """The default router's accuracy on the first test images, which tests/test_shipped_checkpoint.py re-measures."""
    n_slice = min(REGRESSION_SLICE, len(routed_correct))
    return {"images": n_slice, "accuracy_routed": float(routed_correct[:n_slice].float().mean())}


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
        "stored_numbers": t.model.stored_numbers(),
        "checkpoint_bytes": Path(twin).stat().st_size,
        "recipe": t.recipe,
    }
    return {
        "twin": entry,
        "compression_parameters": entry["stored_parameters"] / report["stored_parameters"],
        "compression_stored_numbers": entry["stored_numbers"] / report["stored_numbers_with_routers"],
        "compression_bytes": entry["checkpoint_bytes"] / report["checkpoint_bytes"],
    }


def _ablation(groups: dict[str, list[str | Path]], test: Dataset) -> dict:
    """Each group's checkpoints on the test split: accuracy at every depth, per seed and as mean and spread (half
    the range), stored numbers, max depth's MACs, and the recipe of its first checkpoint."""
    result = {}
    for name, paths in groups.items():
        runs = []
        for path in paths:
            a = load_checkpoint(path)
            _, a_correct = accuracy_by_depth(a, test)
            runs.append(
                {
                    "checkpoint": str(path),
                    "kind": a.kind,
                    "accuracy_by_depth": a_correct.float().mean(0).tolist(),
                    "stored_numbers": a.model.stored_numbers(),
                    "stored_parameters": a.model.stored_parameters(),
                    "macs_max_depth": a.model.macs(a.config.max_depth),
                    "recipe": a.recipe,
                }
            )
        accs = torch.tensor([r["accuracy_by_depth"] for r in runs])
        result[name] = {
            "runs": runs,
            "mean_by_depth": accs.mean(0).tolist(),
            "spread_by_depth": ((accs.max(0).values - accs.min(0).values) / 2).tolist(),
        }
    return result


def _write(report: dict, out: Path, plots: bool) -> None:
    """model-report.json, the plot (optional: it needs matplotlib) and model-report.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-report.json").write_text(json.dumps(report, indent=2) + "\n")
    if plots:
        plot(report, out / "model-report.png")
    (out / "model-report.md").write_text(render_markdown(report, plots))
