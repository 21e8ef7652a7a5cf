"""docs/model-report.md and its plot, rendered from the report that model/evaluate.py measured (no measuring here)."""

from __future__ import annotations

import math
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def signed(x: float, digits: int = 2) -> str:
    """`x` with its sign, a true minus for negatives, and no sign where it rounds to zero (not "-0.00") or is NaN."""
    text = f"{abs(x):.{digits}f}"
    if math.isnan(x) or float(text) == 0:
        return text
    return ("+" if x > 0 else "\u2212") + text


def _pt(x: float) -> str:
    """A difference of accuracies (fractions), in signed percentage points."""
    return f"{signed(100 * x)} pt"


def plot(report: dict, path: Path) -> None:
    """Accuracy against mean MMACs: fixed depths, every router's curve, random depth, the default, the twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["routing"]
    fig, ax = plt.subplots(figsize=(8, 5))
    fixed_m = [m / 1e6 for m in r["fixed"]["macs"]]
    ax.plot(fixed_m, [100 * a for a in r["fixed"]["accuracy"]], "ko-", label="fixed depth 1..D (and their mixes)")
    for name, entry in r["routers"].items():
        curve = entry["curve"]
        ax.plot([p["test_macs"] / 1e6 for p in curve], [100 * p["test_accuracy"] for p in curve], ".-", label=name)
    d, rnd = r["default"], r["random_same_distribution"]
    ax.plot([rnd["macs"] / 1e6], [100 * rnd["mean"]], "gs", label="random depth, default's depth shares")
    ax.plot([d["test_macs"] / 1e6], [100 * d["test_accuracy"]], "r*", ms=14, label=f"served default ({d['router']})")
    if "twin" in report:
        ax.axhline(100 * report["twin"]["accuracy_max_depth"], color="gray", ls="--", label="static twin")
    tops = [p["test_accuracy"] for e in r["routers"].values() for p in e["curve"]] + r["fixed"]["accuracy"]
    tops.append(report.get("twin", {}).get("accuracy_max_depth", 0.0))
    ax.set_ylim(100 * min(r["fixed"]["accuracy"]) - 0.3, 100 * max(tops) + 0.3)
    ax.set_xlabel("mean MMACs per test image (both passes of a cascade, and the router, counted)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("depth routers against fixed depth at equal compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(r: dict, plots: bool) -> str:
    """docs/model-report.md from the report `evaluate` measured, one section after another."""
    sections = [
        _md_intro(r),
        _md_targets(r),
        _md_accuracy(r),
        _md_routers(r),
        _md_correlation(r),
        _md_size(r),
        _md_ablation(r),
        _md_kernels(r),
    ]
    if plots:
        sections.append(["![depth routers against fixed depth at equal compute](model-report.png)"])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _md_intro(r: dict) -> list[str]:
    rec = r["recipe"]
    kd = "no teacher"
    if rec.get("teacher"):
        kd = (
            f"distilled from `{rec['teacher']}` (sha256 `{rec.get('teacher_sha256', '')[:16]}…`), "
            f"alpha {rec.get('kd_alpha')}, T {rec.get('kd_temperature')}"
        )
    return [
        "# Puppet-CNN model report",
        "",
        f"Written by `puppet-cnn evaluate` for `{r['checkpoint']}` (version `{r['version']}`, sha256 `{r['sha256'][:16]}…`)",
        f"on {r['test_images']:,} {r['dataset']} test images. Machine: {r['machine']['platform']}, "
        f"{r['machine']['torch_threads']} torch thread(s). The whole evaluation took {r['evaluation_seconds']:.1f} s.",
        "",
        f"Recipe (from the checkpoint): ranks {rec.get('ranks')}, {rec.get('epochs')} epochs, batch {rec.get('batch_size')} "
        f"per process, AdamW lr {rec.get('lr')}, depth sampling `{rec.get('depth_sampling')}`, {kd}, in-place "
        f"distillation {rec.get('inplace_distillation', False)}, bf16 {rec.get('bf16')}. Trained on: "
        f"{r.get('trained_on', 'not recorded')}. Routers calibrated on the {rec.get('val_size')}-image validation split only.",
    ]


def _md_targets(r: dict) -> list[str]:
    lines = ["## Targets (test split)", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**missed**'} |" for t in r["targets"]]
    return lines


def _md_accuracy(r: dict) -> list[str]:
    d_max = len(r["accuracy_by_depth"])
    lines = [
        "## Accuracy at each depth",
        "",
        "| depth | top-1 | MMACs / image | share of images at this final depth (served default) |",
        "|---|---|---|---|",
    ]
    for d in range(d_max):
        lines.append(
            f"| {d + 1} | {_pct(r['accuracy_by_depth'][d])} | {r['macs_by_depth'][d] / 1e6:.1f} | {_pct(r['depth_share'][d])} |"
        )
    dflt = r["routing"]["default"]
    lines.append(
        f"| **served default: {dflt['router']} at budget {dflt['budget']}** | **{_pct(r['accuracy_routed'])}** | "
        f"**{dflt['test_macs'] / 1e6:.1f}** (mean) | mean final depth {r['mean_depth']:.2f} of {d_max} |"
    )
    return lines


def _md_routers(r: dict) -> list[str]:
    ro = r["routing"]
    rnd = ro["random_same_distribution"]
    macs_max = ro["fixed"]["macs"][-1]
    lines = [
        "## Depth routers against fixed depth at equal compute",
        "",
        "The fixed-depth curve joins neighbouring fixed depths linearly (a constant mix of two depths costs and scores "
        "that). *Gain* is a router's test accuracy minus that curve's at the router's mean MACs. The budget is the "
        "knob: the most accurate validation point within that share of max depth's MACs.",
        "",
        "| router | budget | settings | val top-1 | test top-1 | mean MMACs (share of D_max) | fixed curve there | gain | escalated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in ro["routers"].items():
        for p in entry["at_budget"]:
            settings = p["settings"].get("depths", p["settings"])
            lines.append(
                f"| {name} | {p['budget']} | `{settings}` | {_pct(p['val_accuracy'])} | {_pct(p['test_accuracy'])} | "
                f"{p['test_macs'] / 1e6:.1f} ({100 * p['test_macs'] / macs_max:.0f}%) | {_pct(p['fixed_curve_accuracy'])} | "
                f"{_pt(p['gain'])} | {_pct(p['escalated_share'])} |"
            )
    best = {n: max(e["curve"], key=lambda p: p["gain"]) for n, e in ro["routers"].items()}
    lines += [
        "",
        "Best gain anywhere on each router's test curve (chosen after seeing the test split, so optimistic): "
        + "; ".join(f"{n} {_pt(p['gain'])} at {p['test_macs'] / 1e6:.1f} MMACs" for n, p in best.items())
        + ".",
        f"- Random depth with the served default's final-depth shares (100 draws): {_pct(rnd['mean'])} ± "
        f"{100 * rnd['std']:.2f} pt at {rnd['macs'] / 1e6:.1f} MMACs.",
        f"- Per-image oracle (right at some depth): {_pct(ro['oracle'])}.",
        f"- The served default run through the per-sample-depth forward (both passes) agrees with the figures gathered "
        f"from the fixed-depth passes on every image: {r['routed_matches_gathered']}; it ran the test set in "
        f"{r['routed_forward_seconds']:.2f} s.",
    ]
    return lines


def _md_correlation(r: dict) -> list[str]:
    lines = [
        "## Does each router's score track the loss?",
        "",
        "Spearman correlation of the router's difficulty score (entropy: H; learned: 1 − predicted P(depth 1 right); "
        "cascade: 1 − the first pass's top-1 probability) with the per-image cross-entropy, at the served budget's point.",
        "",
        "| router | vs loss at depth 1 | vs loss at max depth |",
        "|---|---|---|",
    ]
    for name, entry in r["routing"]["routers"].items():
        p = next(p for p in entry["at_budget"] if p["budget"] == r["routing"]["default"]["budget"])
        lines.append(
            f"| {name} | {signed(p['spearman_score_vs_loss_depth1'], 3)} | {signed(p['spearman_score_vs_loss_max_depth'], 3)} |"
        )
    return lines


def _md_size(r: dict) -> list[str]:
    lines = ["## Size: puppet against its static twin", ""]
    if "twin" not in r:
        return [*lines, f"Stored numbers: {r['stored_numbers_with_routers']:,} (no twin given)."]
    d_max = len(r["accuracy_by_depth"])
    t = r["twin"]
    return [
        *lines,
        "Stored numbers count every number the checkpoint keeps: parameters, batch-norm running statistics, and the "
        "learned router's weights.",
        "",
        f"| model | stored parameters | stored numbers | checkpoint bytes | top-1 at depth {d_max} |",
        "|---|---|---|---|---|",
        f"| Puppet-CNN | {r['stored_parameters']:,} | {r['stored_numbers_with_routers']:,} | {r['checkpoint_bytes']:,} | "
        f"{_pct(r['accuracy_by_depth'][-1])} |",
        f"| static twin | {t['stored_parameters']:,} | {t['stored_numbers']:,} | {t['checkpoint_bytes']:,} | "
        f"{_pct(t['accuracy_max_depth'])} |",
        f"| ratio | **{r['compression_parameters']:.2f}×** | **{r['compression_stored_numbers']:.2f}×** | "
        f"**{r['compression_bytes']:.2f}×** | {_pt(t['accuracy_max_depth'] - r['accuracy_by_depth'][-1])} (twin − puppet) |",
    ]


def _md_ablation(r: dict) -> list[str]:
    lines = ["## What the ODE contributes, and the plain CNN of the same size", ""]
    a = r.get("ablation", {})
    if "ode" not in a or "tied" not in a:
        return [*lines, "Not measured in this run (no ablation checkpoints given)."]
    ode, tied = a["ode"], a["tied"]
    rec = ode["runs"][0]["recipe"]
    seeds = min(len(ode["runs"]), len(tied["runs"]))

    def cell(group: dict, d: int) -> str:
        per_seed = " / ".join(_pct(run["accuracy_by_depth"][d]) for run in group["runs"])
        if len(group["runs"]) == 1:
            return per_seed
        return f"{_pct(group['mean_by_depth'][d])} ± {100 * group['spread_by_depth'][d]:.2f} ({per_seed})"

    lines += [
        "The puppeteer (dP/dl = G(P)) against tied kernels (G ≡ 0: every layer of a stage uses P_0, with larger ranks "
        f"for equal stored numbers), {len(ode['runs'])} and {len(tied['runs'])} seed(s), {rec.get('epochs')} epochs on "
        f"{rec.get('limit') or 'all'} training images, one validation split for every seed. "
        + (
            "Mean ± half the range over seeds, then each seed:"
            if seeds > 1
            else "**One seed only, so no spread yet**: the differences below may be within seed-to-seed noise."
        ),
        "",
        "| depth | ODE puppeteer | tied kernels | ODE − tied (means) |",
        "|---|---|---|---|",
    ]
    for d in range(len(ode["mean_by_depth"])):
        lines.append(
            f"| {d + 1} | {cell(ode, d)} | {cell(tied, d)} | "
            f"{_pt(ode['mean_by_depth'][d] - tied['mean_by_depth'][d])} |"
        )
    lines.append(f"| stored numbers | {ode['runs'][0]['stored_numbers']:,} | {tied['runs'][0]['stored_numbers']:,} | |")
    if "plain" in a:
        p = a["plain"]["runs"][0]
        o = ode["runs"][0]
        lines += [
            "",
            f"A plain CNN of {p['stored_numbers']:,} stored numbers (every kernel stored; {p['macs_max_depth'] / 1e6:.1f} "
            f"MMACs), same recipe: **{_pct(p['accuracy_by_depth'][-1])}**, against the ODE puppet's "
            f"{_pct(ode['mean_by_depth'][-1])} at depth {len(ode['mean_by_depth'])} ({o['stored_numbers']:,} stored "
            f"numbers, {o['macs_max_depth'] / 1e6:.1f} MMACs): "
            f"{_pt(ode['mean_by_depth'][-1] - p['accuracy_by_depth'][-1])} for the puppet.",
        ]
    return lines


def _md_kernels(r: dict) -> list[str]:
    return [
        "## Cost of generating kernels",
        "",
        f"Generating every depth's kernels once takes {r['kernel_generation_ms']:.2f} ms (median of 20, no grad); "
        "the service does it once at start-up and caches them.",
        "",
        f"Regression guard: on the first {r['regression_slice']['images']} test images the served default router's "
        f"accuracy is {_pct(r['regression_slice']['accuracy_routed'])} (tests/test_shipped_checkpoint.py checks it "
        "within 0.5 pt).",
    ]
