"""The `quanta` command line: parse arguments, call one typed function."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import format_table, run_demo

    rows = run_demo(quick=args.quick)
    print("\n" + format_table(rows))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .io import QuantaFileError, inspect
    from .io.safe_file import read

    try:
        report = inspect(args.path, show=False)
        if args.verify:
            read(args.path)  # every tensor's dtype, shape and checksum
    except (OSError, QuantaFileError) as e:
        print(f"quanta inspect: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.verify and not args.json:
        print("verified: every tensor matches its recorded dtype, shape and SHA-256")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    import json

    from .kernels.doctor import diagnose

    report = diagnose(build=args.build)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quanta", description="Quantize trained PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train small models offline and compare quantization schemes")
    demo.add_argument("--quick", action="store_true", help="shorter training (for CI)")
    demo.set_defaults(func=_demo)
    insp = sub.add_parser("inspect", help="show what a file written by quanta.save holds")
    insp.add_argument("path", help="a .safetensors file written by quanta.save")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.add_argument("--verify", action="store_true", help="also read every tensor and check its checksum")
    insp.set_defaults(func=_inspect)
    doc = sub.add_parser("doctor", help="show the native CPU kernels: what is built, for which CPU, what falls back")
    doc.add_argument("--build", action="store_true",
                     help="build the native kernels for this environment first if none match (as first use would)")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
