"""The model's sub-commands of `puppet-cnn`: train, evaluate, export-onnx.

They live beside the code they run, so `model/` owns its command line; service/cli.py builds the one
`puppet-cnn` parser, adds `serve`, and registers these through `add_commands`. Heavy modules (training,
evaluation, ONNX export) are imported only when their command runs, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import fields

from model.checkpoint import SHIPPED_CHECKPOINT


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _add_train(sub: argparse._SubParsersAction) -> None:
    from model.train import TrainConfig

    p = sub.add_parser("train", help="train a puppet (or its static twin); resumable, torchrun-aware")
    defaults = TrainConfig()
    p.add_argument("--dataset", default=defaults.dataset, choices=["fashion-mnist", "cifar10", "cifar100", "folder"])
    p.add_argument(
        "--data-dir", default=None, help="dataset directory (CIFAR python batches, or folder/<split>/<class>/)"
    )
    p.add_argument("--kind", default=defaults.kind, choices=["puppet", "twin"])
    p.add_argument("--widths", type=_ints, default=defaults.widths, help="stage widths, e.g. 16,32,64")
    p.add_argument("--ranks", type=_ints, default=defaults.ranks, help="Tucker-2 rank per stage, e.g. 8,16,20")
    p.add_argument("--max-depth", type=int, default=defaults.max_depth)
    p.add_argument("--solver", default=defaults.solver, choices=["euler", "rk4", "midpoint"])
    p.add_argument("--tied", action="store_true", help="ablation: G = 0, one kernel per stage")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument("--depth-sampling", default=defaults.depth_sampling, choices=["sandwich", "all", "max"])
    p.add_argument("--teacher", default=None, help="checkpoint to distil from (the static twin)")
    p.add_argument("--init-from", default=None, help="warm start from this checkpoint (same architecture and split)")
    p.add_argument("--kd-alpha", type=float, default=defaults.kd_alpha, help="weight of the soft-target term")
    p.add_argument("--kd-temperature", type=float, default=defaults.kd_temperature)
    p.add_argument(
        "--inplace-distillation",
        action=argparse.BooleanOptionalAction,
        default=defaults.inplace_distillation,
        help="shallower depths learn from the deepest depth's output of the same step",
    )
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: where the device computes bf16 natively: CUDA with bf16, CPUs with "
        "AVX512-BF16/AMX; float32 elsewhere)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the validation split (default: --seed); keep the teacher's",
    )
    p.add_argument("--val-size", type=int, default=defaults.val_size)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=defaults.tolerance, help="depth table: accuracy a bin may lose")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)} - {"history"}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    ckpt = train(cfg, progress=not args.quiet)
    if ckpt is not None:
        print(f"wrote {cfg.out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy per depth, routing, size vs the static twin; writes docs/model-report.md"
    )
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--twin", default=None, help="static twin checkpoint, for the size and accuracy comparison")
    p.add_argument("--ablation-ode", nargs="+", default=[], help="ODE puppets of the ablation, one a seed")
    p.add_argument("--ablation-tied", nargs="+", default=[], help="tied-kernel puppets of equal stored numbers")
    p.add_argument("--plain-cnn", nargs="+", default=[], help="a plain CNN of the puppet's stored numbers")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (a quick look)")
    p.add_argument("--out", default="docs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from model.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    groups = {"ode": args.ablation_ode, "tied": args.ablation_tied, "plain": args.plain_cnn}
    ablation = {name: paths for name, paths in groups.items() if paths} or None
    r = evaluate(
        args.checkpoint,
        twin=args.twin,
        ablation=ablation,
        data_dir=args.data_dir,
        out=args.out,
        plots=args.plots,
        test_limit=args.test_limit,
    )
    print(
        f"top-1 by depth {[round(100 * a, 2) for a in r['accuracy_by_depth']]}; served default "
        f"{r['routing']['default']['router']} {100 * r['accuracy_routed']:.2f}% at mean depth {r['mean_depth']:.2f}; "
        f"report in {args.out}/model-report.md"
    )
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from model.router_fit import DEFAULT_BUDGET

    p = sub.add_parser(
        "calibrate-routers",
        help="fit the entropy, learned and cascade routers on the validation split; stores them in the checkpoint",
    )
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--out", default=None, help="where to write the calibrated checkpoint (default: in place)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="default budget, a share of max depth's MACs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.router_fit import fit_routers, validation_split

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget must be in (0, 1], got {args.budget}")
    ckpt = load_checkpoint(args.checkpoint)
    ckpt.routers = fit_routers(ckpt, validation_split(ckpt, args.data_dir), budget=args.budget)
    out = save_checkpoint(ckpt, args.out or args.checkpoint)
    point = ckpt.routers.point(ckpt.routers.default_router)
    print(
        f"wrote {out}: default router {ckpt.routers.default_router} at budget {ckpt.routers.default_budget:.3f} "
        f"(validation {100 * point['val_accuracy']:.2f}% at {point['val_macs'] / 1e6:.1f} MMACs)"
    )
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx", help="one ONNX graph per depth, kernels folded in, plus a manifest tied to the checkpoint"
    )
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    p.add_argument(
        "--out", required=True, help="output directory (serve it with PUPPET_BACKEND=onnx PUPPET_ONNX_DIR=...)"
    )
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.onnx_export import export_onnx

    manifest = export_onnx(load_checkpoint(args.checkpoint), args.out, opset=args.opset)
    print(f"wrote {manifest.parent}/depth-*.onnx and {manifest}")
    return 0


_COMMANDS = {
    "train": _add_train,
    "calibrate-routers": _add_calibrate,
    "evaluate": _add_evaluate,
    "export-onnx": _add_export,
}
COMMANDS = tuple(_COMMANDS)


def add_commands(sub: argparse._SubParsersAction, names: Iterable[str] = COMMANDS) -> None:
    """Add the named model commands to `sub`, in the order given.

    Each sub-command's `func` default runs it and returns the exit status. `names` lets the caller
    interleave its own commands: service/cli.py lists `serve` between `evaluate` and `export-onnx`.
    """
    for name in names:
        _COMMANDS[name](sub)
