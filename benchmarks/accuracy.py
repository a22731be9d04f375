"""Task accuracy of quanta's PTQ recipes on trained CNNs: method × model → top-1 accuracy, agreement
with fp32's top-1, SQNR of the logits, time taken by `quanta.quantize`, peak memory.

    python benchmarks/accuracy.py            # full run -> benchmarks/results/ACCURACY.md
    python benchmarks/accuracy.py --quick    # smoke run (1 training epoch, few rows) -> results/accuracy_quick.md

Models (accuracy_models.py): a MobileNetV2-style and a ResNet-style CNN, trained here with seed 0
(weights cached) on scikit-learn's digits and, where the Debian package ``dataset-fashion-mnist``
is installed (or ``--fashion-root DIR``), Fashion-MNIST. Every quantized row is the integer model
``quanta.quantize`` returns (speed check off, so every lowerable layer is integer), evaluated on
the held-out test images. A gain is compared with the paired noise of the test set: two rows
that differ on ``d`` test images have a standard error of ``100·√d / n`` points; a gain under twice
that is marked "within noise".
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Self

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("TQDM_DISABLE", "1")

import accuracy_models as AM
import report
import torch

SEED = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row: weight format (None: the float model), the algorithms quanta runs, and the row
    whose accuracy the gain column compares against."""

    key: str  # unique; ``base`` names a key
    label: str  # "+ x" rows add algorithms to their base
    weight: str | None  # "w8_channel" | "w8_tensor" | "w4_channel" | None
    algorithms: tuple[str, ...] = ()
    base: str | None = None
    quick: bool = True  # also in --quick


CLE_HBA_BC = ("cle", "high_bias_absorption", "bias_correction")
RECIPES = (
    Recipe("fp32", "fp32", None),
    Recipe("w8c", "static_int8 (W8 per-channel, A8)", "w8_channel"),
    Recipe("w8c_dfq", "+ cle + high_bias_absorption + bias_correction", "w8_channel", CLE_HBA_BC, "w8c", False),
    Recipe("w8c_best", "+ best_calibration", "w8_channel", ("best_calibration",), "w8c", False),
    Recipe("w8t", "W8 per-tensor, A8 (round to nearest)", "w8_tensor"),
    Recipe("w8t_cle", "+ cle", "w8_tensor", ("cle",), "w8t", False),
    Recipe("w8t_dfq", "+ cle + high_bias_absorption + bias_correction", "w8_tensor", CLE_HBA_BC, "w8t"),
    Recipe("w8t_ebc", "+ empirical_bias_correction", "w8_tensor", ("empirical_bias_correction",), "w8t", False),
    Recipe("w8t_best", "+ best_calibration", "w8_tensor", ("best_calibration",), "w8t", False),
    Recipe("w4c", "W4 per-channel, A8 (round to nearest)", "w4_channel"),
    Recipe("w4c_ada", "+ adaround", "w4_channel", ("adaround",), "w4c"),
)


def quant_config(recipe: Recipe, adaround_iterations: int) -> Any:
    """static_int8 (its module rules, BatchNorm folding, calibrated uint8 activations) with the
    recipe's weight format and algorithms."""
    from quanta.nn import LayerQuantConfig, QuantDescriptor
    from quanta.transforms.presets import A8_STATIC, preset

    weights = {"w8_channel": QuantDescriptor(per_channel=True, narrow_range=True),
               "w8_tensor": QuantDescriptor(per_channel=False, narrow_range=True),
               "w4_channel": QuantDescriptor(num_bits=4, per_channel=True, narrow_range=True)}
    config = dataclasses.replace(preset("static_int8"), default=LayerQuantConfig(input=A8_STATIC,
                                                                                 weight=weights[recipe.weight]))
    if not recipe.algorithms:
        return config
    options = {"adaround": {"iterations": adaround_iterations}} if "adaround" in recipe.algorithms else None
    return config.extended(algorithms=recipe.algorithms, algorithm_options=options)


# ---------------------------------------------------------------- peak memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be understated
        pass


class PeakRSS:
    """Peak resident memory above the level at entry, in MiB: Linux's high-water mark VmHWM, reset
    at entry through /proc/self/clear_refs ("5"); where that is not possible, RSS sampled every
    2 ms by a thread (which may miss a short peak). ``how`` says which."""

    def __enter__(self) -> Self:
        _release_free_heap()  # freed memory the allocator kept would hide the next peak
        self.start = _status_kib("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.how = "VmHWM"
        except OSError:
            self.how = "sampled RSS"
        self.peak = self.start
        self._stop = threading.Event()
        if self.how != "VmHWM":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_kib("VmRSS") or 0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.how == "VmHWM":
            self.peak = _status_kib("VmHWM") or self.start
        else:
            self._thread.join()
        self.mib = max(0, self.peak - self.start) / 1024


# ---------------------------------------------------------------- measuring one row
@dataclasses.dataclass
class Result:
    label: str
    accuracy: float | None = None
    agreement: float | None = None
    sqnr_db: float | None = None
    seconds: float | None = None
    peak_mib: float | None = None
    integer: str = ""
    gain: str = ""
    correct: torch.Tensor | None = None
    error: str = ""


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def integer_count(model: torch.nn.Module) -> str:
    import quanta

    rows = quanta.conversion_report(model)
    ints = [r for r in rows if r.result not in ("float", "simulated")]
    return f"{len(ints)}/{len(rows)}"


def paired_gain(row: Result, base: Result, n: int) -> str:
    """Accuracy gain over ``base`` and whether it stands out of the test set's paired noise."""
    differ = int((row.correct != base.correct).sum())
    gain = row.accuracy - base.accuracy
    se = 100.0 * math.sqrt(differ) / n
    verdict = "within noise" if abs(gain) < 2 * se or differ == 0 else "clear"
    return f"{gain:+.2f} (±{2 * se:.2f}, {verdict})"


def measure(recipe: Recipe, model: torch.nn.Module, data: AM.Dataset, calib: list[torch.Tensor],
            ref_logits: torch.Tensor, ada_iters: int) -> Result:
    import quanta

    res = Result(recipe.label)
    try:
        if recipe.weight is None:
            q, res.integer = model, "float"
        else:
            config = quant_config(recipe, ada_iters)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                q = quanta.quantize(model, config, calib_data=list(calib), speed_check=False, progress=False)
                res.seconds = time.perf_counter() - t0
            res.peak_mib, res.integer = mem.mib, integer_count(q)
        out = logits_of(q, data.x_test)
    except Exception as e:
        res.error = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:140]}"
        return res
    pred = out.argmax(1)
    res.correct = pred == data.y_test
    res.accuracy = 100.0 * res.correct.float().mean().item()
    res.agreement = 100.0 * (pred == ref_logits.argmax(1)).float().mean().item()
    res.sqnr_db = sqnr_db(ref_logits, out)
    return res


def run_model(arch: str, data: AM.Dataset, quick: bool, ada_iters: int, log: Callable[[str], None],
              cache_dir: str | None = None) -> str:
    t0 = time.perf_counter()
    model, cached = AM.trained(arch, data, seed=SEED, log=log, cache_dir=cache_dir)
    log(f"{arch} on {data.name}: {'cached weights' if cached else f'trained in {time.perf_counter() - t0:.0f} s'}")
    g = torch.Generator().manual_seed(SEED)
    n_calib, bs = (2, 32) if quick else (8, 64)
    idx = torch.randperm(len(data.y_train), generator=g)[: n_calib * bs]
    calib = [data.x_train[idx[i * bs:(i + 1) * bs]] for i in range(n_calib)]
    ref = logits_of(model, data.x_test)
    results: dict[str, Result] = {}
    for recipe in RECIPES:
        if quick and not recipe.quick:
            continue
        r = measure(recipe, model, data, calib, ref, ada_iters)
        if recipe.base in results and r.correct is not None and results[recipe.base].correct is not None:
            r.gain = paired_gain(r, results[recipe.base], len(data.y_test))
        results[recipe.key] = r
        log(f"  {recipe.label:<50} " + (r.error or f"{r.accuracy:.2f}%  agree {r.agreement:.2f}%  "
                                                 f"{r.sqnr_db:.1f} dB  {r.seconds or 0:.1f} s"))
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"### {arch} on {data.name}", "",
             (f"{type(model).__name__}, {n_params / 1e3:.0f}k parameters, trained {data.epochs} epoch(s) on "
              f"{len(data.y_train)} images (seed {SEED}); test: {len(data.y_test)} images; calibration: "
              f"{n_calib} batches of {bs} training images (seed {SEED}); AdaRound {ada_iters} iterations per layer."),
             "",
             ("| method | top-1 % | gain vs base (2σ paired) | agrees with fp32 % | logits SQNR dB "
              "| quantize s | peak MiB | integer layers |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results.values():
        name = f"&nbsp;&nbsp;{r.label}" if r.label.startswith("+") else r.label
        if r.error:
            lines.append(f"| {name} | {r.error.replace('|', '/')} | | | | | | |")
            continue
        sq = "exact" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}"
        lines.append(f"| {name} | {r.accuracy:.2f} | {r.gain} | {r.agreement:.2f} | {sq} | "
                     f"{'—' if r.seconds is None else f'{r.seconds:.1f}'} | "
                     f"{'—' if r.peak_mib is None else f'{r.peak_mib:.0f}'} | {r.integer} |")
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, command: str, total_s: float) -> str:
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with PeakRSS() as probe:
        pass
    return "\n".join([
        "# quanta accuracy on trained CNNs" + (" (QUICK smoke run: 3 training epochs; not for quoting)" if args.quick else ""),
        "",
        f"- date: {now}; command: `{command}`; total {total_s:.0f} s",
        (f"- CPU: {report.cpu_model()} ({os.cpu_count()} logical cores; {report.cpu_flags()}); "
         f"torch.set_num_threads({args.threads}); torch {torch.__version__}; quanta {report.quanta_version()}"),
        ("- rows: the integer model from `quanta.quantize(model, config, calib_data, speed_check=False)` with "
         "static_int8's rules (BatchNorm folded, uint8 activations calibrated per tensor, percentile 99.999) and "
         "the weight format and algorithms named; `+ x` rows add algorithms to the row above them (their base); "
         "integer layers: layers lowered to integer kernels / layers quantized (the rest stay simulated)"),
        ("- gain: accuracy minus the base row's; ± is twice the paired standard error 100·√d/n (d = test images "
         "on which the two rows differ in correctness); a gain under it is within noise"),
        ("- agreement: share of test images where the row's top-1 equals fp32's; SQNR: "
         "10·log10(‖fp32 logits‖² / ‖logits − fp32 logits‖²) over the test set"),
        (f"- quantize s: wall time of `quanta.quantize` (calibration and algorithms included; shared machine, noisy); "
         f"peak MiB: peak resident memory above the level before the call ({probe.how})"),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, MobileNetV2-style only, 3 training epochs, "
                    "128 test images, fewer rows, AdaRound 5 iterations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: accuracy does not depend on "
                    "it, and one thread does not collapse on a shared machine as OpenMP teams do)")
    ap.add_argument("--arch", action="append", choices=list(AM.ARCHITECTURES), help="repeatable; default: all")
    ap.add_argument("--fashion-root", help="folder with Fashion-MNIST's idx files (default: the Debian package's)")
    ap.add_argument("--no-fashion", action="store_true", help="digits only")
    ap.add_argument("--no-digits", action="store_true", help="Fashion-MNIST only")
    ap.add_argument("--adaround-iterations", type=int, help="per layer (default 100; quick 5)")
    ap.add_argument("--cache-dir", help="where trained weights are cached (default: quanta's cache folder)")
    ap.add_argument("--out", help="Markdown file (default results/ACCURACY.md, quick: results/accuracy_quick.md)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.no_digits and args.no_fashion:
        ap.error("--no-digits with --no-fashion leaves no data")
    out = args.out or os.path.join(HERE, "results", "accuracy_quick.md" if args.quick else "ACCURACY.md")
    ada = args.adaround_iterations or (5 if args.quick else 100)
    torch.set_num_threads(args.threads)
    datasets = [] if args.no_digits and not args.quick else [AM.digits16(quick=args.quick)]
    if not (args.quick or args.no_fashion):
        fm = AM.fashion(args.fashion_root)
        if fm is None:
            print("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist): digits only")
        else:
            datasets.append(fm)
    if not datasets:
        print("no data to run on (--no-digits and Fashion-MNIST is not installed)", file=sys.stderr)
        return 2
    if args.quick:
        d = datasets[0]
        datasets = [dataclasses.replace(d, x_test=d.x_test[:128], y_test=d.y_test[:128])]
    print(f"quanta {report.quanta_version()}", flush=True)  # a native build waited on here is not timed below
    t0 = time.perf_counter()
    tables = [run_model(arch, d, args.quick, ada, lambda s: print(s, flush=True), args.cache_dir)
              for d in datasets for arch in (args.arch or (['mobilenet_v2'] if args.quick else list(AM.ARCHITECTURES)))]
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = header(args, command.strip(), time.perf_counter() - t0) + "\n" + "\n".join(tables)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
