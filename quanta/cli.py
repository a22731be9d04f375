"""The `quanta` command line: parse arguments, call one typed function."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import format_table, run_demo

    rows = run_demo(quick=args.quick)
    print("\n" + format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quanta", description="Quantize trained PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train small models offline and compare quantization schemes")
    demo.add_argument("--quick", action="store_true", help="shorter training (for CI)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
