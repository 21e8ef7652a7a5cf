"""The model report end to end on small checkpoints: routers calibrated on validation, the served default run for
real, the ablation groups, and the markdown that renders them."""

import json

import pytest

from model import load_checkpoint
from model.checkpoint import save_checkpoint
from model.evaluate import evaluate
from model.report_render import signed
from model.router_fit import fit_routers, validation_split
from model.train import TrainConfig, train

TEST_IMAGES = 2000  # of the 10,000: the same code on a fifth of the work
SMALL = {"widths": (8, 16), "ranks": (4, 8), "max_depth": 3, "limit": 1200, "val_size": 300, "batch_size": 50}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")

    def run(name, **kw):
        cfg = TrainConfig(**(SMALL | kw), epochs=1, max_steps=8, out=str(tmp / f"{name}.safetensors"), bf16=False)
        train(cfg, progress=False)
        return cfg.out

    paths = {
        "ode": [run("ode-s0"), run("ode-s1", seed=1, split_seed=0)],
        "tied": [run("tied-s0", tied=True, ranks=(6, 10))],
        "plain": [run("plain", kind="twin", depth_sampling="max", widths=(4, 8))],
    }
    ckpt = load_checkpoint(paths["ode"][0])
    ckpt.routers = fit_routers(ckpt, validation_split(ckpt), budget=0.9)
    save_checkpoint(ckpt, ckpt.path)
    return tmp, paths


@pytest.mark.integration
def test_the_report_measures_what_it_serves_and_renders_every_section(checkpoints):
    tmp, paths = checkpoints
    r = evaluate(
        paths["ode"][0], twin=paths["plain"][0], ablation=paths, out=tmp / "docs", plots=False, test_limit=TEST_IMAGES
    )
    assert r["test_images"] == TEST_IMAGES
    # the served default through the real two-pass forward agrees with the figures gathered per depth
    assert r["routed_matches_gathered"] is True
    assert r["routing"]["default"]["test_accuracy"] == pytest.approx(r["accuracy_routed"], abs=1e-12)
    assert set(r["routing"]["routers"]) == {"entropy", "learned", "cascade"}
    for entry in r["routing"]["routers"].values():
        for p in entry["at_budget"]:
            assert p["gain"] == pytest.approx(p["test_accuracy"] - p["fixed_curve_accuracy"])
    ode = r["ablation"]["ode"]
    assert len(ode["runs"]) == 2 and ode["runs"][1]["recipe"]["seed"] == 1
    a, b = (run["accuracy_by_depth"][0] for run in ode["runs"])
    assert ode["mean_by_depth"][0] == pytest.approx((a + b) / 2) and ode["spread_by_depth"][0] == pytest.approx(
        abs(a - b) / 2
    )
    assert [t["target"] for t in r["targets"]][-1] == "stored numbers >= 10x fewer than the twin"
    md = (tmp / "docs" / "model-report.md").read_text()
    for heading in (
        "## Targets",
        "## Depth routers against fixed depth",
        "## Does each router's score",
        "## What the ODE",
    ):
        assert heading in md
    assert f"on {TEST_IMAGES:,} fashion-mnist test images" in md
    assert "2 and 1 seed(s)" in md and "One seed only" in md and "A plain CNN of" in md
    assert json.loads((tmp / "docs" / "model-report.json").read_text())["sha256"] == r["sha256"]


@pytest.mark.parametrize(
    "x, digits, text",
    [
        (0.0036, 2, "0.00"),
        (0.36, 2, "+0.36"),
        (-0.86, 2, "\u22120.86"),
        (-0.004, 2, "0.00"),
        (-0.1234, 3, "\u22120.123"),
        (float("nan"), 3, "nan"),
    ],
)
def test_signed_figures_use_a_true_minus_and_no_sign_on_zero(x, digits, text):
    assert signed(x, digits) == text
