"""The `quanta` command line: parse arguments, call one typed function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .calib import RANGE_METHODS
from .commands.errors import CommandError


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    report = run_demo(quick=args.quick)
    print("\n" + report.markdown())
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


def _config_choice(args: argparse.Namespace) -> Any:
    from .commands.quantize_cmd import ConfigChoice

    return ConfigChoice(preset=args.preset, config_file=getattr(args, "config", None), group_size=args.group_size,
                        weight_bits=args.weight_bits, exclude=tuple(args.exclude), algorithms=tuple(getattr(args, "algorithm", ())),
                        attention_matmuls=getattr(args, "attention_matmuls", None))


def _quantize(args: argparse.Namespace) -> int:
    from .commands.quantize_cmd import QuantizeJob, quantize_file

    print(quantize_file(QuantizeJob(
        output=args.output, spec=args.spec, hf=args.hf, config=_config_choice(args), calib=args.calib,
        images=_image_options(args), calib_batch_size=args.calib_batch_size, calib_method=args.calib_method, calib_batches=args.calib_batches,
        speed_check=not args.no_speed_check, input_shape=args.input_shape, progress=not args.quiet,
        float_dtype=args.float_dtype)))
    return 0


def _config_dump(args: argparse.Namespace) -> int:
    from .commands.quantize_cmd import dump_preset

    print(dump_preset(_config_choice(args)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .commands.bench_cmd import BenchJob, bench

    print(bench(BenchJob(target=args.target, model=args.model, input_shape=args.input_shape,
                         config=_config_choice(args), rounds=args.rounds, threads=args.threads)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .commands.export_cmd import ExportJob, export_file

    print(export_file(ExportJob(file=args.file, output=args.output, model=args.model, input_shape=args.input_shape,
                                opset=args.opset, dynamic_batch=args.dynamic_batch)))
    return 0


def _supported(args: argparse.Namespace) -> int:
    from .commands.supported import text

    print(text(as_markdown=args.markdown))
    return 0


def _analysis_job(args: argparse.Namespace) -> Any:
    from .commands.report_cmd import AnalysisJob

    return AnalysisJob(file=args.file, model=args.model, calib=args.calib, batch_size=args.calib_batch_size,
                       batches=args.batches, input_shape=args.input_shape, images=_image_options(args))


def _compare(args: argparse.Namespace) -> int:
    from .commands.report_cmd import compare_file

    print(compare_file(_analysis_job(args)))
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from .commands.report_cmd import report_file

    print(report_file(_analysis_job(args), args.output, latency=args.latency))
    return 0


def _image_options(args: argparse.Namespace) -> Any:
    from .commands.images import ImageOptions

    return ImageOptions(size=tuple(args.image_size) if args.image_size else None, channels=args.channels,
                        mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="size images of a --calib folder are resized and center-cropped to (default: the model's, "
                        "from a .pt2 program's example input or a transformers config's image_size)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="images as RGB (3) or grayscale (1) (default: the model's, else 3)")
    p.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="subtracted from images scaled to [0, 1] (one value or one per channel)")
    p.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="images are divided by it after --mean (one value or one per channel)")


def _weight_bits_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-bits", type=int, default=None, choices=(7, 8),
                   help="static_int8 / dynamic_int8 weight codes: 7 runs oneDNN exactly on CPUs without VNNI")


def _preset_options(p: argparse.ArgumentParser, with_config: bool) -> None:
    from .transforms import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named quantization recipe (dynamic_int8 when neither --preset nor --config is given)")
    if with_config:
        p.add_argument("--config", metavar="FILE", help="a QuantConfig as JSON (or YAML), e.g. from `quanta config dump`")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="module name or glob that stays float (repeatable)")
    p.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128, 256),
                   help="int4 group size of the weight_only_int4 preset")
    _weight_bits_option(p)
    _algorithm_option(p)


def _algorithm_option(p: argparse.ArgumentParser) -> None:
    from .algorithms import ALGORITHMS

    p.add_argument("--algorithm", action="append", default=[], choices=sorted(ALGORITHMS), metavar="NAME",
                   help=f"PTQ algorithm the pipeline runs (repeatable, in order): {', '.join(sorted(ALGORITHMS))}")


def _version() -> str:
    from ._version import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (exit status 2, as argparse's), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = _Parser(prog="quanta", description="Quantize trained PyTorch models.",
                                     formatter_class=fmt, parents=[common])
    parser.add_argument("--version", action="version", version=f"quanta {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=fmt, parents=[common])
        p.set_defaults(func=func)
        return p

    demo = command("demo", _demo, "train small models offline and compare quantization schemes")
    demo.add_argument("--quick", action="store_true", help="shorter training (for CI)")
    insp = command("inspect", _inspect, "show what a file written by quanta.save holds")
    insp.add_argument("path", help="a .safetensors file written by quanta.save")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.add_argument("--verify", action="store_true", help="also read every tensor and check its checksum")
    doc = command("doctor", _doctor, "show the native CPU kernels: what is built, for which CPU, what falls back")
    doc.add_argument("--build", action="store_true",
                     help="build the native kernels for this environment first if none match (as first use would)")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")

    quant = command("quantize", _quantize, "quantize a model and write it as one .safetensors file")
    quant.add_argument("spec", nargs="?", help="package.module:factory or file.py:factory (the factory returns "
                                                "a model or (model, calibration_data)), or a torch.export .pt2 file")
    quant.add_argument("--hf", metavar="DIR", help="a transformers model directory (save_pretrained), loaded offline")
    quant.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="file to write")
    _preset_options(quant, with_config=True)
    quant.add_argument("--attention-matmuls", choices=("on", "off"), default=None,
                       help="static_int8 / dynamic_int8: quantize MultiheadAttention's Q·Kᵀ and softmax·V inputs "
                            "(on, the default) or compute them in float (off)")
    quant.add_argument("--calib", metavar="PATH", help="calibration inputs (instead of the spec's data): .pt, .npy or "
                                                        ".safetensors, a tensor [N, ...] or a list of tensors; or a "
                                                        "folder of .png/.jpg images")
    _image_flags(quant)
    quant.add_argument("--calib-batch-size", type=int, default=32,
                       help="batch size a [N, ...] --calib tensor (or folder of images) is split into")
    quant.add_argument("--calib-method", choices=RANGE_METHODS,
                       default=None, help="override each quantizer's range method (default: the preset's)")
    quant.add_argument("--calib-batches", type=int, default=None, metavar="N", help="calibrate on the first N batches")
    quant.add_argument("--no-speed-check", action="store_true",
                       help="make every lowerable layer integer, even where its kernel is slower than float")
    quant.add_argument("--input-shape", metavar="N,C,H,W",
                       help="random input of this shape for the speed check (default: the first calibration batch; "
                            "without either, no speed check)")
    quant.add_argument("--float-dtype", choices=("float32", "bfloat16"), default=None,
                       help="dtype of the float work between integer layers (LayerNorm, attention, GELU, residuals, "
                            "layers kept float) and of the model's inputs and outputs; bfloat16 pays on CPUs with "
                            "native bfloat16 (AVX-512 BF16 / AMX)")
    quant.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    conf = command("config", _config_dump, "show the QuantConfig a preset means")
    conf_sub = conf.add_subparsers(dest="config_command", required=True)
    dump = conf_sub.add_parser("dump", help="print a preset's QuantConfig as JSON (edit it, pass it to --config)",
                               formatter_class=fmt, parents=[common])
    dump.add_argument("preset", nargs="?", default="dynamic_int8", help="preset name")
    dump.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                      help="module name or glob that stays float (repeatable)")
    dump.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128, 256),
                      help="int4 group size of the weight_only_int4 preset")
    _weight_bits_option(dump)
    _algorithm_option(dump)
    dump.set_defaults(func=_config_dump)

    ben = command("bench", _bench, "latency and size of a quantized model vs its fp32 model on this machine")
    ben.add_argument("target", help="a file written by quanta.save (with --model) or a model spec or .pt2 program "
                                    "(quantized here)")
    ben.add_argument("--model", metavar="SPEC", help="the float model's spec (or .pt2 program), for a file")
    ben.add_argument("--input-shape", metavar="N,C,H,W", help="random input of this shape (default: the first "
                                                              "batch of the spec's calibration data)")
    _preset_options(ben, with_config=False)
    ben.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ben.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")

    exp = command("export", _export, "export a file written by quanta.save to ONNX (QDQ)")
    exp.add_argument("file", help="a .safetensors file written by quanta.save")
    exp.add_argument("--model", metavar="SPEC", help="the float model's spec or .pt2 program (default: rebuild "
                                                     "from the file)")
    exp.add_argument("--input-shape", metavar="N,C,H,W", help="example input shape (default: the first batch of "
                                                              "the spec's calibration data)")
    exp.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the lowest that works)")
    exp.add_argument("--dynamic-batch", action="store_true", help="leave the batch axis free")

    cmp_ = command("compare", _compare, "where a quantized file loses accuracy: each layer against its float model")
    rep = command("report", _report_cmd, "an HTML report (tables and plots) of a quantized file against its float model")
    for p in (cmp_, rep):
        p.add_argument("file", help="a .safetensors file written by quanta.save")
        p.add_argument("--model", required=True, metavar="SPEC", help="the float model's spec or .pt2 program")
        p.add_argument("--calib", metavar="PATH", help="inputs to run (.pt, .npy or .safetensors, or a folder of "
                                                        "images; default: the spec's calibration data)")
        _image_flags(p)
        p.add_argument("--calib-batch-size", type=int, default=32, help="batch size a [N, ...] --calib tensor is split into")
        p.add_argument("--batches", type=int, default=2, help="how many batches to run through both models")
        p.add_argument("--input-shape", metavar="N,C,H,W", help="a random input of this shape instead of data")
    sup = command("supported", _supported, "which modules each preset quantizes, into which integer modules and "
                                           "kernels (found by running the pipeline on small examples)")
    sup.add_argument("--markdown", action="store_true", help="the README's Markdown tables (markers included)")
    rep.add_argument("-o", "--output", required=True, metavar="OUT.html", help="report file (PNGs and .md beside it)")
    rep.add_argument("--latency", action="store_true", help="also time each integer layer against float")
    return parser


def _report(command: str, error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (CommandError, ValueError, TypeError, OSError)):
        message = f"{type(error).__name__}: {message}"
    print(f"quanta {command}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: usage error, 1: the command failed)."""
    args = build_parser().parse_args(argv)
    command = args.command + (f" {args.config_command}" if args.command == "config" else "")
    try:
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # output piped into `head`: stop quietly, as a Unix tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"quanta {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line per failure; the traceback with --debug
        if getattr(args, "debug", False):
            raise
        _report(command, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
