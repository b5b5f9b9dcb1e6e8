"""The `vlmtune` command line: one subcommand per user task, each calling one function."""

from __future__ import annotations

import argparse
import sys

from .errors import VlmtuneError


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from .models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.out, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny random {args.arch} checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tiny-model", help="write a tiny random Qwen-VL checkpoint with a real processor")
    t.add_argument("out", help="output directory")
    t.add_argument("--arch", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], default="qwen2_vl")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VlmtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
