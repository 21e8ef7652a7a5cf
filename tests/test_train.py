"""Training proves its loop on real Fashion-MNIST: loss falls, checkpoints are servable, resume and DDP work.

Precision: bf16 autocast by default only where the device computes bf16 natively; these tests hold on CPUs
with and without AVX512-BF16 (the native answer is read from /proc/cpuinfo, or forced).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, _randomise_norms
from model import device as device_module
from model import load_checkpoint, resolve_device
from model import train as train_module
from model.data import split_train_val
from model.device import describe_device, native_bf16
from model.puppet import PuppetConfig, build_model
from model.train import Objective, TrainConfig, augment, train, warmup_cosine

SMALL = {"widths": (8, 16), "ranks": (4, 8), "max_depth": 3}


def _loss(model, ckpt_pre, images, labels):
    model.eval()
    with torch.no_grad():
        x = ckpt_pre.normalise(images)
        return [F.cross_entropy(model(x, d), labels).item() for d in range(1, 4)]


@pytest.mark.integration
def test_a_few_hundred_steps_lower_the_loss_at_every_depth(tmp_path):
    cfg = TrainConfig(
        **SMALL, epochs=1, batch_size=32, limit=10600, val_size=1000, lr=1e-2, out=str(tmp_path / "m.safetensors")
    )
    ckpt = train(cfg, progress=False)
    assert ckpt.recipe["limit"] == 10600 and cfg.history[0]["step"] == 300  # 9600 / 32
    # the same initial weights as train() builds: seed, then build
    torch.manual_seed(cfg.seed)
    initial = build_model("puppet", ckpt.config)
    from model import load_dataset

    test = load_dataset("fashion-mnist", "test").subset(slice(0, 1000))
    before = _loss(initial, ckpt.preprocessing, test.images, test.labels)
    after = _loss(ckpt.model, ckpt.preprocessing, test.images, test.labels)
    for d in range(3):
        assert after[d] < 0.7 * before[d], f"depth {d + 1}: loss {before[d]:.3f} -> {after[d]:.3f}"
    accuracy = cfg.history[0]["val_accuracy_by_depth"]
    assert min(accuracy) > 0.55, accuracy  # chance is 0.10
    # the written checkpoint is complete and servable
    loaded = load_checkpoint(cfg.out)
    assert loaded.classes[0] == "T-shirt/top" and loaded.policy.max_depth == 3
    assert loaded.metrics["validation"]["epoch"] == 1


@pytest.mark.integration
def test_resume_continues_from_the_saved_state(tmp_path):
    out = str(tmp_path / "m.safetensors")
    common = dict(**SMALL, batch_size=64, limit=1500, val_size=300, out=out, bf16=False)
    train(TrainConfig(**common, epochs=1), progress=False)
    resumed = TrainConfig(**common, epochs=2, resume=True)
    train(resumed, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[1]["step"] == 2 * resumed.history[0]["step"]


def _torchrun_train(tmp_path, out, *extra):
    """`puppet-cnn train` on a small puppet in two gloo processes on the CPU; fails the test if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PUPPET_TEACHER_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "service.cli", "train", "--widths", "8,16", "--ranks", "4,8", "--max-depth", "2",
        "--limit", "1200", "--val-size", "200", "--batch-size", "50", "--epochs", "1", "--max-steps", "6",
        "--threads", "1", "--device", "cpu", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.integration
def test_ddp_with_two_cpu_processes_on_gloo(tmp_path):
    """Two processes, distilling from a teacher whose logits rank 0 caches while rank 1 waits."""
    teacher = TrainConfig(
        widths=(8, 16), ranks=(4, 8), max_depth=2, kind="twin", depth_sampling="max", limit=1200, val_size=200,
        batch_size=50, epochs=1, max_steps=2, out=str(tmp_path / "twin.safetensors"), bf16=False,
    )  # fmt: skip
    train(teacher, progress=False)
    out = tmp_path / "ddp.safetensors"
    _torchrun_train(tmp_path, out, "--teacher", teacher.out)
    ckpt = load_checkpoint(out)
    assert ckpt.metrics["world_size"] == 2 and ckpt.metrics["trained_on"].endswith("2 training process(es)")
    assert ckpt.metrics["validation"]["step"] == 6  # each rank stepped 6 times on its half of the data
    assert ckpt.recipe["teacher"] == teacher.out and len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.integration
def test_ddp_ranks_draw_their_own_augmentation_and_depths(tmp_path):
    """Without a teacher nothing else tells the ranks' streams apart: after identical initial weights (one seed
    on every rank) each rank must still draw its own shifts, flips and sandwich depths. Rank 0 draws exactly what
    a single process with the same seed draws over the same steps, so single-process checkpoints reproduce."""
    out = tmp_path / "ddp.safetensors"
    _torchrun_train(tmp_path, out)
    rank0, rank1 = torch.load(out.with_suffix(".state.pt"), weights_only=True)["rng_by_rank"]
    assert not torch.equal(rank0, rank1), "both ranks drew the same augmentation stream"
    single = TrainConfig(
        widths=(8, 16), ranks=(4, 8), max_depth=2, limit=1200, val_size=200, batch_size=50, epochs=1, max_steps=6,
        threads=1, device="cpu", out=str(tmp_path / "single.safetensors"),
    )  # fmt: skip
    train(single, progress=False)
    (alone,) = torch.load(tmp_path / "single.state.pt", weights_only=True)["rng_by_rank"]
    assert torch.equal(rank0, alone), "rank 0 no longer draws what a single process draws"


@pytest.mark.integration
def test_a_resume_on_another_world_size_gives_each_rank_a_stream_of_its_own(tmp_path):
    """A state saved by one process holds one random state: resumed on two, rank 0 goes on with it and rank 1
    derives its own (the same one every time), rather than both drawing rank 0's."""
    common = dict(**SMALL, batch_size=64, limit=1500, val_size=300, out=str(tmp_path / "m.safetensors"), bf16=False)
    train(TrainConfig(**common, epochs=1, device="cpu"), progress=False)
    saved = torch.load(tmp_path / "m.state.pt", weights_only=True)["rng"]
    streams = []
    for rank in (0, 1, 1):
        run = train_module._set_up(TrainConfig(**common, epochs=2, resume=True), torch.device("cpu"), rank, 2)
        train_module._resume(run, auto_bf16=False)
        streams.append(torch.get_rng_state())
    assert torch.equal(streams[0], saved)
    assert not torch.equal(streams[1], saved) and torch.equal(streams[1], streams[2])


def test_objectives_cover_the_depths():
    torch.manual_seed(0)
    model = build_model("puppet", PuppetConfig(widths=(4,), ranks=(2,), max_depth=3, image_size=8))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    single = F.cross_entropy(model(x, 3), y)
    total = sum(F.cross_entropy(model(x, d), y) for d in (1, 2, 3))
    torch.testing.assert_close(Objective(model, "max", 0.0)(x, y)[0], single)
    torch.testing.assert_close(Objective(model, "all", 0.0)(x, y)[0], total)
    sandwich = Objective(model, "sandwich", 0.0)(x, y)[0]
    assert sandwich > single
    with pytest.raises(ValueError, match="depth_sampling"):
        Objective(model, "some", 0.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sandwich_depths_come_from_the_cpu_generator_on_every_device(device):
    """The resumable state keeps the CPU generator only, so the sandwich's shallow depths must come from it on a
    GPU too (a CUDA draw would restart from a fresh seed on resume). Runs on CUDA where there is one."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    model = build_model("puppet", PuppetConfig(widths=(4,), ranks=(2,), max_depth=3, image_size=8)).to(device)
    x, y = torch.randn(4, 1, 8, 8, device=device), torch.tensor([0, 1, 2, 3], device=device)
    torch.manual_seed(7)
    shallow = torch.randint(1, 3, (4,))
    after = torch.rand(1)
    expected = F.cross_entropy(model(x, 3), y) + F.cross_entropy(model(x, shallow.to(device)), y)
    torch.manual_seed(7)
    loss = Objective(model, "sandwich", 0.0)(x, y)[0]
    torch.testing.assert_close(loss, expected)
    assert torch.equal(torch.rand(1), after)  # the CPU generator moved by exactly that draw


def test_augment_translates_and_flips_without_changing_content():
    img = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    img[:, :, 3:5, 3:5] = 200
    out = augment(img, pad=2)
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert (out.sum(dim=(1, 2, 3)) == 4 * 200).all()  # a centred square never leaves the frame
    assert len({tuple(o.nonzero()[0].tolist()) for o in out}) > 5  # and it moves


def test_warmup_cosine_schedule():
    f = warmup_cosine(100, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def _tiny(tmp_path, **kw) -> TrainConfig:
    small = {**SMALL, "epochs": 1, "batch_size": 32, "limit": 600, "val_size": 100, "max_steps": 2}
    return TrainConfig(**{**small, "out": str(tmp_path / "m.safetensors"), **kw})


def test_native_bf16_on_this_cpu_matches_its_flags():
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    assert native_bf16(torch.device("cpu")) is bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize(
    ("flags", "native"), [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)]
)
def test_native_bf16_reads_the_cpuinfo_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    monkeypatch.setattr(device_module, "CPUINFO", str(cpuinfo))
    assert native_bf16(torch.device("cpu")) is native
    assert describe_device(torch.device("cpu"), 2).startswith("cpu: Test CPU (")  # the same one reading
    monkeypatch.setattr(device_module, "CPUINFO", str(tmp_path / "missing"))
    assert native_bf16(torch.device("cpu")) is False  # unreadable: float32


def test_bf16_defaults_to_the_native_precision_and_is_recorded(tmp_path):
    cfg = _tiny(tmp_path)
    assert cfg.bf16 is None
    ckpt = train(cfg, progress=False)
    assert cfg.bf16 is native_bf16(resolve_device(cfg.device))
    assert ckpt.recipe["bf16"] is cfg.bf16 and load_checkpoint(cfg.out).recipe["bf16"] is cfg.bf16


@pytest.mark.parametrize(("bf16", "native", "used"), [(None, False, False), (None, True, True), (False, True, False)])
def test_autocast_follows_the_device_unless_set(tmp_path, monkeypatch, bf16, native, used):
    monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
    enabled, autocast = [], torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **kw: enabled.append(kw["enabled"]) or autocast(*a, **kw))
    cfg = _tiny(tmp_path, bf16=bf16)
    train(cfg, progress=False)
    assert enabled == [used, used] and load_checkpoint(cfg.out).recipe["bf16"] is used


@pytest.mark.integration
def test_resume_keeps_the_precision_it_started_with(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    train(_tiny(tmp_path, max_steps=None, batch_size=128), progress=False)
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)  # e.g. resumed on an AVX2-only host
    resumed = _tiny(tmp_path, max_steps=None, batch_size=128, epochs=2, resume=True)
    train(resumed, progress=False)
    assert resumed.bf16 is True and [h["epoch"] for h in resumed.history] == [1, 2]
    forced = _tiny(tmp_path, max_steps=None, batch_size=128, epochs=3, resume=True, bf16=False)
    train(forced, progress=False)
    assert forced.bf16 is False and load_checkpoint(forced.out).recipe["bf16"] is False


def test_distillation_loss_is_the_tempered_kl():
    from model.train import distillation_loss

    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(distillation_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-7)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)  # target p, student q at T = 2
    expected = 4 * float((p * (p / q).log()).sum())
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_objective_distils_the_deepest_depth_from_the_teacher_and_the_rest_from_it():
    from model.train import distillation_loss

    torch.manual_seed(0)
    model = build_model("puppet", PuppetConfig(widths=(4,), ranks=(2,), max_depth=3, image_size=8))
    _randomise_norms(model)  # fresh residual branches are zero: every depth would answer alike
    x, y, teacher = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.randn(4, 10)
    a, t = 0.7, 3.0
    deep = model(x, 3)

    def mixed(logits, soft):
        return (1 - a) * F.cross_entropy(logits, y) + a * distillation_loss(logits, soft, t)

    inplace = Objective(model, "all", 0.0, kd_alpha=a, kd_temperature=t, inplace_distillation=True)
    expected = mixed(deep, teacher) + sum(mixed(model(x, d), deep.detach()) for d in (1, 2))
    torch.testing.assert_close(inplace(x, y, teacher)[0], expected)
    from_teacher = Objective(model, "all", 0.0, kd_alpha=a, kd_temperature=t, inplace_distillation=False)
    torch.testing.assert_close(from_teacher(x, y, teacher)[0], sum(mixed(model(x, d), teacher) for d in (1, 2, 3)))
    # in-place distillation needs no teacher; the deepest depth then learns from the labels alone
    no_teacher = inplace(x, y)[0]
    torch.testing.assert_close(
        no_teacher, F.cross_entropy(deep, y) + sum(mixed(model(x, d), deep.detach()) for d in (1, 2))
    )
    # the shallow depths' targets are detached: the gradient is that of the detached expression, not the attached one

    def head_grad(loss):
        model.zero_grad()
        loss.backward()
        return model.head.weight.grad.clone()

    def manual(detach):
        d = model(x, 3)
        target = d.detach() if detach else d
        return F.cross_entropy(d, y) + sum(mixed(model(x, k), target) for k in (1, 2))

    got = head_grad(inplace(x, y)[0])
    torch.testing.assert_close(got, head_grad(manual(detach=True)))
    assert not torch.allclose(got, head_grad(manual(detach=False)))


def test_training_with_a_teacher_caches_its_logits_for_both_views(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "TEACHER_CACHE", tmp_path / "cache")
    teacher_cfg = TrainConfig(
        **SMALL, kind="twin", depth_sampling="max", epochs=1, max_steps=3, batch_size=50, limit=600, val_size=100,
        out=str(tmp_path / "twin.safetensors"), bf16=False,
    )  # fmt: skip
    train(teacher_cfg, progress=False)
    cfg = TrainConfig(
        **SMALL, epochs=1, max_steps=3, batch_size=50, limit=600, val_size=100, out=str(tmp_path / "p.safetensors"),
        teacher=teacher_cfg.out, bf16=False,
    )  # fmt: skip
    ckpt = train(cfg, progress=False)
    from model.checkpoint import file_sha256

    assert ckpt.recipe["teacher"] == teacher_cfg.out and ckpt.recipe["teacher_sha256"] == file_sha256(teacher_cfg.out)
    assert ckpt.recipe["kd_alpha"] == 0.9 and ckpt.recipe["inplace_distillation"] is True
    (cached,) = (tmp_path / "cache").iterdir()
    logits = torch.load(cached, weights_only=True)
    from model import load_dataset

    data = load_dataset("fashion-mnist", "train").subset(slice(0, 600))
    train_set, _ = split_train_val(data, 100, 0)
    teacher = load_checkpoint(teacher_cfg.out)
    assert logits.shape == (2, 500, 10)
    with torch.no_grad():
        teacher.model.cache_kernels()
        for view, images in enumerate((train_set.images[:20], train_set.images[:20].flip(3))):
            direct = teacher.model(teacher.preprocessing.normalise(images))
            torch.testing.assert_close(logits[view, :20], direct, rtol=1e-4, atol=1e-4)


def test_each_step_gets_the_teacher_row_of_its_own_images_and_view(tmp_path, monkeypatch):
    """The cached row for image i and view v holds (i, v): every step must receive (its indices, its flips)."""
    n = 500

    def fake_teacher(cfg, train_set, classes, device, rank, world):
        rows = torch.zeros(2, n, 10)
        rows[:, :, 0] = torch.arange(n, dtype=torch.float32)
        rows[1, :, 1] = 1.0
        return rows

    flips_seen, index_seen = [], []

    def flipping(images, pad=2):  # no shift; every other image mirrored
        flip = torch.arange(len(images)) % 2 == 1
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images), flip

    class Spy(Objective):
        def forward(self, x, y, teacher=None):
            index_seen.append(teacher[:, 0].long())
            flips_seen.append(teacher[:, 1].bool())
            return super().forward(x, y, None)

    monkeypatch.setattr(train_module, "_teacher_logits", fake_teacher)
    monkeypatch.setattr(train_module, "augment_with_flips", flipping)
    monkeypatch.setattr(train_module, "Objective", Spy)
    cfg = TrainConfig(
        **SMALL, epochs=1, max_steps=3, batch_size=50, limit=600, val_size=100, out=str(tmp_path / "p.safetensors"),
        teacher="unused", bf16=False,
    )  # fmt: skip
    train(cfg, progress=False)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000))
    assert torch.equal(torch.cat(index_seen), perm[:150])  # the step's own images, in order
    assert all(torch.equal(f, torch.arange(50) % 2 == 1) for f in flips_seen)  # and the view each was shown in


def test_a_warm_start_begins_from_the_checkpoint_and_refuses_another_architecture_or_split(tmp_path):
    common = dict(**SMALL, epochs=1, max_steps=3, batch_size=50, limit=600, val_size=100, bf16=False)
    first = train(TrainConfig(**common, out=str(tmp_path / "a.safetensors")), progress=False)
    # lr 0: the optimiser moves nothing, so the warm-started run ends on the weights it started from
    warm = TrainConfig(**common, seed=1, split_seed=0, lr=0.0, init_from=str(tmp_path / "a.safetensors"))
    warm.out = str(tmp_path / "b.safetensors")
    second = train(warm, progress=False)
    before, after = dict(first.model.named_parameters()), dict(second.model.named_parameters())
    assert before.keys() == after.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    from model.checkpoint import file_sha256

    assert second.recipe["init_from"] == warm.init_from
    assert second.recipe["init_sha256"] == file_sha256(warm.init_from)
    # a cold start from seed 1 would not have these weights
    cold = train(
        TrainConfig(**common, seed=1, split_seed=0, lr=0.0, out=str(tmp_path / "c.safetensors")), progress=False
    )
    assert not torch.equal(dict(cold.model.named_parameters())["head.weight"], before["head.weight"])
    other_ranks = TrainConfig(
        **{**common, "ranks": (4, 6)}, init_from=warm.init_from, out=str(tmp_path / "d.safetensors")
    )
    with pytest.raises(ValueError, match="another architecture"):
        train(other_ranks, progress=False)
    other_split = TrainConfig(**common, split_seed=5, init_from=warm.init_from, out=str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="split"):
        train(other_split, progress=False)
