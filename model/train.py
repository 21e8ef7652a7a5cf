"""Training: every depth stays usable, so any request can be routed to any depth.

Objectives (`depth_sampling`):
  sandwich  loss at max depth plus loss at a random shallower depth per sample (per-sample exit),
            3/5 of the block work of `all` for D_max = 4 (4 + 2 blocks on average, against 1 + 2 + 3 + 4);
            the shipped default.
  all       the head after every depth, losses summed.
  max       max depth only (the static twin, a traditional CNN).

Distillation (recorded in the recipe like every other choice):
  teacher               a trained checkpoint (the static twin) whose logits on the training split are computed
                        once, for every image and its mirror image, and cached under runs/: the teacher costs
                        nothing per epoch. Random shifts of up to 2 px reuse the unshifted image's logits.
  kd_alpha, kd_temperature
                        the deepest depth learns (1 - alpha) CE(labels) + alpha T^2 KL(teacher_T || student_T).
  inplace_distillation  the shallower depth of a sandwich step learns from the deepest depth's detached output
                        of the same step, with the same alpha and T (without a teacher too).

Runs on one process or under `torchrun` (DDP; gloo on CPU, nccl on CUDA). Each epoch writes a
servable checkpoint (depth table calibrated on the validation split) and a resumable training state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.checkpoint import Checkpoint, Preprocessing, save_checkpoint
from model.complexity import complexity
from model.data import Dataset, load_dataset, split_train_val
from model.depth_policy import DepthPolicy, calibrate
from model.device import describe_device, native_bf16, resolve_device
from model.predict import predict_all_depths
from model.puppet import Backbone, PuppetConfig, build_model

VERSION_PREFIX = "puppet-cnn"


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    kind: str = "puppet"
    widths: tuple[int, ...] = (16, 32, 64)
    ranks: tuple[int, ...] = (12, 18, 21)
    max_depth: int = 4
    solver: str = "euler"
    tied: bool = False
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    depth_sampling: str = "sandwich"
    teacher: str | None = None  # checkpoint to distil from (the static twin); None: labels only
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    inplace_distillation: bool = True
    teacher_sha256: str = ""  # set from `teacher` when training starts
    init_from: str | None = None  # warm start: a checkpoint of the same architecture and validation split
    init_sha256: str = ""  # set from `init_from` when training starts
    augment: bool = True
    bf16: bool | None = None  # bf16 autocast; None: where the device computes bf16 natively (`native_bf16`)
    seed: int = 0
    split_seed: int | None = None  # which validation split; None: `seed` (ablation seeds keep their teacher's split)
    val_size: int = 6000
    limit: int | None = None  # use only the first `limit` training images (tests, smoke runs)
    max_steps: int | None = None  # stop after this many optimiser steps in total
    calibration_bins: int = 8
    tolerance: float = 0.004
    threads: int | None = None
    device: str = "auto"
    out: str = "checkpoints/puppet-cnn-fmnist.safetensors"
    resume: bool = False
    history: list = field(default_factory=list)


# -- data helpers -----------------------------------------------------------------------------------


def augment(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and horizontal flip, per sample. uint8 in/out."""
    return augment_with_flips(images, pad)[0]


def augment_with_flips(images: torch.Tensor, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment`, and which images it mirrored (bool, (B,)): the teacher's logits are cached for both views."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1))
    ox = torch.randint(0, 2 * pad + 1, (b, 1))
    rows = (oy + torch.arange(h)).view(b, 1, h, 1)
    cols = (ox + torch.arange(w)).view(b, 1, 1, w)
    out = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    flip = torch.rand(b) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out), flip


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def warmup_cosine(total_steps: int, warmup: int):
    """LR factor: linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- objective --------------------------------------------------------------------------------------


def distillation_loss(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(target / T) || softmax(student / T)), batch mean: Hinton et al.'s soft-target term."""
    t = temperature
    return (t * t) * F.kl_div(
        F.log_softmax(student.float() / t, dim=-1),
        F.log_softmax(target.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


class Objective(nn.Module):
    """The training loss as one module, so DDP sees a single forward per step.

    With `kd_alpha` > 0 each depth's loss is (1 - alpha) CE + alpha KD: the deepest depth's soft targets are the
    teacher's logits (when given), a shallower depth's are the deepest depth's own, detached (in-place
    distillation), or the teacher's when that is off."""

    def __init__(
        self,
        model: Backbone,
        depth_sampling: str,
        label_smoothing: float,
        *,
        kd_alpha: float = 0.0,
        kd_temperature: float = 4.0,
        inplace_distillation: bool = False,
    ):
        super().__init__()
        if depth_sampling not in ("sandwich", "all", "max"):
            raise ValueError(f"depth_sampling must be sandwich, all or max, got {depth_sampling!r}")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {kd_alpha}")
        self.model, self.depth_sampling, self.label_smoothing = model, depth_sampling, label_smoothing
        self.kd_alpha, self.kd_temperature, self.inplace = kd_alpha, kd_temperature, inplace_distillation

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if soft is None or self.kd_alpha == 0.0:
            return ce
        return (1.0 - self.kd_alpha) * ce + self.kd_alpha * distillation_loss(logits, soft, self.kd_temperature)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d_max = self.model.config.max_depth
        sandwich = self.depth_sampling == "sandwich" and d_max > 1
        if sandwich:
            # drawn from the CPU generator on every device: its state is what `_save_state` keeps, so a resumed
            # GPU run draws what it would have drawn, not the CUDA generator's fresh seed. Drawn (and copied)
            # before any pass is queued, beside the step's images; the deepest pass draws nothing, so CPU runs
            # draw what they drew before
            shallow = torch.randint(1, d_max, (x.shape[0],)).to(x.device)
        logits = self.model(x, d_max)
        loss = self._loss(logits, y, teacher)
        shallow_soft = logits.detach() if self.inplace else teacher
        if sandwich:
            loss = loss + self._loss(self.model(x, shallow), y, shallow_soft)
        elif self.depth_sampling == "all":
            for d in range(1, d_max):
                loss = loss + self._loss(self.model(x, d), y, shallow_soft)
        return loss, logits


# -- evaluation helpers used while training ------------------------------------------------------


# -- the loop ---------------------------------------------------------------------------------------


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train(cfg: TrainConfig, *, progress: bool = True) -> Checkpoint | None:
    """Train (or resume) and return the final checkpoint (rank 0; None on other ranks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, rank = _start_process(cfg.device, world)
    auto_bf16 = cfg.bf16 is None
    if auto_bf16:
        cfg.bf16 = native_bf16(device)  # resolved, so the recipe records the precision actually used
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    run = _set_up(cfg, device, rank, world)
    _own_stream(cfg.seed, rank)
    start_epoch, step, elapsed = 0, 0, 0.0
    if cfg.resume and run.state_path.exists():
        start_epoch, step, elapsed = _resume(run, auto_bf16)
    if not (cfg.teacher or cfg.inplace_distillation):
        cfg.kd_alpha = 0.0  # no soft targets at all: the recipe records what was used
    objective = Objective(
        run.model,
        cfg.depth_sampling,
        cfg.label_smoothing,
        kd_alpha=cfg.kd_alpha,
        kd_temperature=cfg.kd_temperature,
        inplace_distillation=cfg.inplace_distillation,
    )
    runner = nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    ckpt = None
    for epoch in range(start_epoch, cfg.epochs):
        step, train_loss, train_acc, seconds = _train_epoch(run, runner, epoch, step, progress)
        elapsed += seconds
        rng = _rng_states(world)  # every rank's generator, so a resumed run draws what it would have
        if _is_main():
            ckpt = _end_of_epoch(
                cfg, run.model, run.pre, run.val_set, run.classes, epoch, step, train_loss, train_acc, elapsed,
                trained_on=describe_device(device, world),
            )  # fmt: skip
            _save_state(run, epoch, step, elapsed, rng)
        if world > 1:
            dist.barrier()
        if cfg.max_steps and step >= cfg.max_steps:
            break
    if world > 1:
        dist.destroy_process_group()
    return ckpt


@dataclass
class _Run:
    """What a training run sets up once and every epoch works with, so the steps of `train` share one argument."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    classes: tuple[str, ...]
    train_set: Dataset
    val_set: Dataset
    pre: Preprocessing
    model: Backbone
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    state_path: Path  # the resumable training state, beside the checkpoint
    teacher_logits: torch.Tensor | None = None  # (2, N, K): the teacher on each training image, and mirrored


def _own_stream(seed: int, rank: int, salt: int = 0) -> None:
    """Give every rank but 0 a random stream of its own for augmentation and depth sampling.

    `_set_up` reseeds the global generator with `seed` to build identical initial weights on every rank, so without
    this all ranks would then draw the same shifts, flips and sandwich depths for their (different) images. Rank 0
    keeps the stream it has always had, so a single-process run draws exactly what it did before this existed.
    `salt` (the epoch a resume starts at) tells apart streams derived again when a run resumes."""
    if rank > 0:
        digest = hashlib.sha256(f"puppet-cnn/seed {seed}/rank {rank}/salt {salt}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _start_process(device_name: str, world: int) -> tuple[torch.device, int]:
    """The device this process trains on and its rank; under torchrun, joins the process group first."""
    device = resolve_device(device_name)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    return device, rank


def _set_up(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> _Run:
    """Data, model, optimiser and schedule, in the order that keeps runs reproducible from `cfg.seed`."""
    data = load_dataset(cfg.dataset, "train", Path(cfg.data_dir) if cfg.data_dir else None)
    if cfg.limit:
        data = data.subset(slice(0, cfg.limit))
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_set, val_set = split_train_val(data, min(cfg.val_size, len(data) // 5), split_seed)
    mean, std = channel_stats(train_set.images)
    pre = Preprocessing(train_set.images.shape[-1], train_set.images.shape[1], mean, std)
    model = _build_model(cfg, pre, len(data.classes))
    if cfg.init_from:
        _warm_start(cfg, model, pre, data.classes)
    model = model.to(device)
    steps_per_epoch = math.ceil(len(train_set) / world / cfg.batch_size)
    opt, sched = _optimiser(cfg, model, total_steps=cfg.epochs * steps_per_epoch)
    state_path = Path(cfg.out).with_suffix(".state.pt")
    teacher = _teacher_logits(cfg, train_set, data.classes, device, rank, world)
    return _Run(cfg, device, rank, world, data.classes, train_set, val_set, pre, model, opt, sched, state_path, teacher)


TEACHER_CACHE = Path(os.environ.get("PUPPET_TEACHER_CACHE", "runs/teacher-logits"))


def _teacher_logits(
    cfg: TrainConfig, train_set: Dataset, classes: tuple[str, ...], device: torch.device, rank: int, world: int
) -> torch.Tensor | None:
    """The teacher's float32 logits on every training image and its mirror image, (2, N, K), on the CPU.

    Computed once by rank 0 on the training device and cached under runs/teacher-logits/, keyed by the teacher
    file's sha256 and a hash of the training images and labels; the other ranks wait, and fail with rank 0 when it
    fails. Rank 0 loads the teacher whether the cache is warm or not: building it draws from the seeded generator,
    so a run is the same either way. The teacher's sha256 goes into the recipe."""
    if not cfg.teacher:
        return None
    from model.checkpoint import file_sha256, load_checkpoint

    sha = file_sha256(cfg.teacher)
    cfg.teacher_sha256 = sha
    data = hashlib.sha256(train_set.images.numpy().tobytes() + train_set.labels.numpy().tobytes()).hexdigest()
    path = TEACHER_CACHE / f"{sha[:16]}-{data[:16]}.pt"
    error = None
    if rank == 0:
        try:
            teacher = load_checkpoint(cfg.teacher, device)
            if tuple(teacher.classes) != tuple(classes):
                raise ValueError(f"teacher {cfg.teacher} has classes {teacher.classes}, the data set {classes}")
            if not path.exists():
                _cache_teacher_logits(teacher, train_set.images, path)
        except Exception as e:  # the other ranks must not wait at the barrier for ever
            error = f"rank 0 could not prepare the teacher's logits: {e}"
            if world == 1:
                raise
    if world > 1:
        status = [error]
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise RuntimeError(status[0])
    return torch.load(path, weights_only=True)


def _cache_teacher_logits(teacher: Checkpoint, images: torch.Tensor, path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))  # the other ranks only wait meanwhile
    try:
        logits = torch.stack([_logits(teacher, images), _logits(teacher, images.flip(3))])
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(logits, tmp)
    tmp.replace(path)


@torch.no_grad()
def _logits(ckpt: Checkpoint, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """A checkpoint's float32 logits at its max depth, (N, K), on the CPU."""
    model = ckpt.model.eval()
    model.cache_kernels()
    device = next(model.parameters()).device
    out = [
        model(ckpt.preprocessing.normalise(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def _build_model(cfg: TrainConfig, pre: Preprocessing, num_classes: int) -> Backbone:
    arch = PuppetConfig(
        in_channels=pre.channels,
        num_classes=num_classes,
        image_size=pre.image_size,
        widths=tuple(cfg.widths),
        ranks=tuple(cfg.ranks),
        max_depth=cfg.max_depth,
        solver=cfg.solver,
        tied=cfg.tied,
    )
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return build_model(cfg.kind, arch)


def _warm_start(cfg: TrainConfig, model: Backbone, pre: Preprocessing, classes: tuple[str, ...]) -> None:
    """Start from `cfg.init_from`'s weights (a resumed run then loads its own state over them).

    The checkpoint must have this run's kind, architecture, classes and validation split: its normalisation
    statistics are those of the training split, so a different split (which would put its training images in
    this run's validation set) shows there. Its sha256 goes into the recipe."""
    from model.checkpoint import file_sha256, load_checkpoint

    init = load_checkpoint(cfg.init_from, "cpu")
    problems = []
    if init.kind != cfg.kind:
        problems.append(f"kind {init.kind!r}, not {cfg.kind!r}")
    if tuple(init.classes) != tuple(classes):
        problems.append(f"classes {init.classes}, not {classes}")
    if init.preprocessing != pre:
        problems.append(f"preprocessing {init.preprocessing}, not this run's split's {pre}")
    if not problems:
        try:
            model.load_state_dict(init.model.state_dict())
        except RuntimeError as e:
            problems.append(f"another architecture ({str(e).splitlines()[0]})")
    if problems:
        raise ValueError(f"cannot start from {cfg.init_from}: it has " + "; ".join(problems))
    cfg.init_sha256 = file_sha256(cfg.init_from)


def _optimiser(
    cfg: TrainConfig, model: Backbone, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW, decaying only multi-dimensional parameters outside the norm layers; linear warm-up, then cosine."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "norms" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "norms" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total_steps, warmup=min(300, max(1, total_steps // 10)))
    )
    return opt, sched


def _resume(run: _Run, auto_bf16: bool) -> tuple[int, int, float]:
    """Load the training state `_save_state` wrote; returns (epoch to start at, optimiser steps, seconds trained)."""
    cfg = run.cfg
    state = torch.load(run.state_path, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    cfg.history = json.loads(state["history"])
    by_rank = state.get("rng_by_rank")  # states written before it existed kept rank 0's only
    if by_rank and len(by_rank) == run.world:
        torch.set_rng_state(by_rank[run.rank])
    else:  # saved on another world size: rank 0 goes on with rank 0's state, the others derive their own
        torch.set_rng_state(state["rng"])
        _own_stream(cfg.seed, run.rank, salt=state["epoch"])
    if auto_bf16 and "bf16" in state:  # a resumed run keeps its precision; an explicit --bf16/--no-bf16 wins
        cfg.bf16 = bool(state["bf16"])
    return state["epoch"], state["step"], state["elapsed"]


def _train_epoch(
    run: _Run, runner: nn.Module, epoch: int, step: int, progress: bool
) -> tuple[int, float, float, float]:
    """One pass over this rank's share of the training set (or up to `max_steps`).

    Returns (optimiser steps so far, mean training loss, training accuracy, seconds the pass took).
    """
    cfg, rank, world, train_set = run.cfg, run.rank, run.world, run.train_set
    run.model.train()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    perm = torch.randperm(len(train_set), generator=g)[rank::world]
    bar = tqdm(
        range(0, len(perm), cfg.batch_size),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not (progress and rank == 0),
        leave=True,
    )
    seen = correct = 0
    loss_sum = 0.0
    for i in bar:
        idx = perm[i : i + cfg.batch_size]
        images = train_set.images[idx]
        flips = torch.zeros(len(idx), dtype=torch.bool)
        if cfg.augment:
            images, flips = augment_with_flips(images)
        x, y = run.pre.normalise(images.to(run.device)), train_set.labels[idx].to(run.device)
        soft = None if run.teacher_logits is None else run.teacher_logits[flips.long(), idx].to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, logits = runner(x, y, soft)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        run.sched.step()
        step += 1
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += loss.item() * len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if cfg.max_steps and step >= cfg.max_steps:
            break
    return step, loss_sum / max(seen, 1), correct / max(seen, 1), time.perf_counter() - t0


def _rng_states(world: int) -> list[torch.Tensor]:
    """Every rank's CPU random state, gathered on all ranks (every rank must call this)."""
    if world == 1:
        return [torch.get_rng_state()]
    states: list = [None] * world
    dist.all_gather_object(states, torch.get_rng_state())
    return states


def _save_state(run: _Run, epoch: int, step: int, elapsed: float, rng: list[torch.Tensor]) -> None:
    """The resumable training state after `epoch`, written atomically: a crash mid-save keeps the last good state."""
    tmp = run.state_path.with_suffix(".tmp")
    torch.save(
        {
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "elapsed": elapsed,
            "history": json.dumps(run.cfg.history),
            "rng": rng[0],
            "rng_by_rank": rng,
            "bf16": run.cfg.bf16,
        },
        tmp,
    )
    tmp.replace(run.state_path)


def _end_of_epoch(
    cfg, model, pre, val_set, classes, epoch, step, train_loss, train_acc, elapsed, *, trained_on: str = ""
) -> Checkpoint:
    logits = predict_all_depths(model, val_set.images, pre)
    correct = (logits.argmax(-1) == val_set.labels).T  # (N, D)
    val_acc = correct.float().mean(0).tolist()
    h = complexity(val_set.images)
    if cfg.kind == "puppet":
        policy = calibrate(h, correct, bins=cfg.calibration_bins, tolerance=cfg.tolerance)
    else:
        policy = DepthPolicy.constant(cfg.max_depth)
    chosen = policy.auto(h)
    policy_acc = float(correct[torch.arange(len(chosen)), chosen - 1].float().mean())
    record = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": round(train_loss, 5),
        "train_accuracy": round(train_acc, 5),
        "val_accuracy_by_depth": [round(a, 5) for a in val_acc],
        "val_accuracy_policy": round(policy_acc, 5),
        "val_mean_depth": round(float(chosen.float().mean()), 4),
        "train_seconds": round(elapsed, 1),
    }
    cfg.history.append(record)
    tqdm.write(json.dumps(record))
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("history", "out", "resume", "data_dir")}
    ckpt = Checkpoint(
        model=model,
        kind=cfg.kind,
        classes=tuple(classes),
        preprocessing=pre,
        policy=policy,
        version=f"{VERSION_PREFIX}-{cfg.kind}-{cfg.dataset}-e{epoch + 1}",
        dataset=cfg.dataset,
        recipe=recipe,
        metrics={
            "validation": record,
            "history": cfg.history,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "trained_on": trained_on,
        },
    )
    save_checkpoint(ckpt, cfg.out)
    return ckpt
