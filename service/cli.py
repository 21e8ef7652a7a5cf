"""The `puppet-cnn` command: train, evaluate, serve, export-onnx (benchmarks: `python -m benchmarks.service_bench`)."""

from __future__ import annotations

import argparse
import sys

from service.process_env import ensure_serving_env


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve POST /classify with the shipped (or a given) checkpoint")
    p.add_argument("--checkpoint", default=None, help="overrides PUPPET_CHECKPOINT")
    p.add_argument("--host", default=None, help="overrides PUPPET_HOST (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="overrides PUPPET_PORT (default 8000)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:  # returns only when the settings are invalid
    from pydantic import ValidationError

    from service.server import run_server  # the process runner: this command is the one place that wires it in
    from service.settings import Settings
    from service.supervisor import exit_drained, serve

    overrides = {k: v for k in ("checkpoint", "host", "port") if (v := getattr(args, k)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"puppet-cnn serve: invalid setting {where}: {err['msg']}", file=sys.stderr)
        return 2
    exit_drained(serve(settings, run_server))


def build_parser() -> argparse.ArgumentParser:
    from model import cli as model_cli  # here, not above: `serve` re-executes itself before torch is imported

    parser = argparse.ArgumentParser(prog="puppet-cnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model_cli.add_commands(sub, ("train", "calibrate-routers", "evaluate"))  # the model's commands: model/cli.py
    _add_serve(sub)
    model_cli.add_commands(sub, ("export-onnx",))
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line (argv None), or these arguments in this process as it is (`serve` without re-executing)."""
    if argv is None and sys.argv[1:2] == ["serve"]:
        ensure_serving_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # DatasetError, CheckpointError and bad arguments: a message, not a traceback
        print(f"puppet-cnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
