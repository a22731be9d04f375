"""Run quanta's speed / size / accuracy benchmarks against fp32 and the peer toolkits.

    python benchmarks/run.py                       # full run (~15 min on 2 cores)
    python benchmarks/run.py --quick               # smoke run: shrunk models, no compile rows (~1 min)
    python benchmarks/run.py --workload bert --workload lstm --out /tmp/r.md
    python benchmarks/run.py --quick --busy        # each batch timed idle, then beside one spinning process
    python benchmarks/run.py --quick --workload tf_mobile --methods fp32,quanta,openvino   # only these rows

All methods of a workload run in this one process, side by side on the same input, timed in
interleaved rounds (see timing.py). Peers (torchao, onnxruntime, ...) are optional: a missing
or failing one is a row that says why.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

os.environ.setdefault("TQDM_DISABLE", "1")  # calibration progress bars would drown the log

import busy
import methods
import peers
import peers_openvino
import report
import timing
import torch
import workloads as W
from methods import Method, fitted_thread_rows, quanta_rows, torch_fp32, torch_fp32_channels_last

QUANTA_PRESETS = {
    "cnn": [("static_int8", {})],
    "transformer": [("dynamic_int8", {})],
    "speech": [("dynamic_int8", {}), ("static_int8", {})],
    "rnn": [("dynamic_int8", {})],
    "linear": [("dynamic_int8", {}), ("weight_only_int8", {}), ("weight_only_int4", {"group_size": 128})],
}


def quanta_presets(kind: str) -> list[tuple[str, dict]]:
    """The quanta rows of a workload kind. On CPUs without VNNI, oneDNN's u8×s8 sums of full-range
    (8-bit) weight codes saturate, so quanta runs those convs on its exact reference kernel and its
    int8 Linears as exact float32 GEMMs on the codes; 7-bit codes (``weight_bits=7``) oneDNN sums
    exactly: CNNs, transformers and the speech encoder there get a ``static_int8 weight_bits=7`` row."""
    presets = list(QUANTA_PRESETS[kind])
    if kind in ("cnn", "transformer", "speech"):
        try:
            from quanta.kernels.u8s8_saturation import cpu_vnni_features
            vnni = bool(cpu_vnni_features())
        except Exception:
            vnni = True
        if not vnni:
            presets.append(("static_int8", {"weight_bits": 7}))
    return presets


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().float(), out.detach().float().reshape(ref.shape)
    noise = (ref - out).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


#: the row families of ``build_methods``, in build order (``--methods`` picks among them)
FAMILIES = ("fp32", "quanta", "torch.ao", "torchao", "pt2e", "onnxruntime", "openvino")


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods fp32,quanta,openvino`` -> the families, validated (an unknown one names the choices)."""
    picked = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in picked if p not in FAMILIES]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"unknown method famil{'ies' if len(unknown) > 1 else 'y'} "
                                         f"{', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                                         f"{','.join(FAMILIES)}")
    return picked


def build_methods(wl: W.Workload, model: torch.nn.Module, threads: int, workdir: str,
                  log=print, families: tuple[str, ...] = FAMILIES, fit_threads: bool = False) -> list[Method]:
    """The rows of one workload; ``fit_threads`` (``--busy``) adds, for each eager quanta row,
    the same model run with its thread count fitted to the free cores (`methods.fitted_thread_rows`)."""
    calib = wl.calib_data()

    def quanta_step() -> list[Method]:
        rows = quanta_rows(model, quanta_presets(wl.kind),
                           calib, wl.input(min(wl.batches)))
        return rows + (fitted_thread_rows(rows) if fit_threads else [])

    steps = [
        ("fp32", lambda: [torch_fp32(model)] + ([torch_fp32_channels_last(model)] if wl.kind == "cnn" else [])),
        ("quanta", quanta_step),
        ("torch.ao", lambda: peers.torch_ao(wl, model, calib)),
        ("torchao", lambda: peers.torchao_rows(wl, model)),
        ("pt2e", lambda: peers.pt2e_x86(wl, model, calib)),
        ("onnxruntime", lambda: peers.ort_rows(wl, model, calib, threads, workdir)),
        ("openvino", lambda: peers_openvino.openvino_rows(wl, model, calib, threads, workdir)),
    ]
    assert [label for label, _ in steps] == list(FAMILIES)
    methods: list[Method] = []
    for label, step in steps:
        if label not in families:
            continue
        t0 = time.perf_counter()
        try:
            rows = step()
        except Exception as e:  # a whole family failing is still only rows
            rows = [Method(label, "peer", error=f"failed: {type(e).__name__}: {e}")]
        log(f"  built {label:<12} {time.perf_counter() - t0:6.1f} s  "
            + ", ".join(f"{m.name} [{'ok' if m.fn is not None else 'x'}]" for m in rows))
        methods += rows
    return methods


def bench_batch(wl: W.Workload, model, methods: list[Method], batch: int, budget: dict, log=print) -> list[report.Row]:
    x = wl.input(batch)
    with torch.inference_mode():
        ref = model(x)
    runners, rows = {}, {}
    for m in methods:
        rows[m.name] = report.Row(m.name, m.group, size_bytes=m.size_bytes)
        if m.fn is None:
            rows[m.name].status = m.error or "failed"
            continue
        xp = m.prep(x.clone())  # each method its own copy: one that writes into it harms no other
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                y = m.post(m.fn(xp))  # first call: compiles if compiled; its output gives SQNR
                m.fn(xp)
            rows[m.name].sqnr_db = sqnr_db(ref, y)
            runners[m.name] = (lambda f=m.fn, a=xp: f(a))
            if isinstance(xp, torch.Tensor) and not torch.equal(xp, x):
                rows[m.name].method += " (⚠ overwrites its input)"
                log(f"    WARNING: {m.name} wrote into its input tensor")
        except Exception as e:
            rows[m.name].status = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:150]}"
        log(f"    warm-up {m.name}: {time.perf_counter() - t0:.1f} s")
    with torch.inference_mode():
        samples, errors = timing.interleaved(runners, **budget)
    for name, s in samples.items():
        rows[name].median_ms, rows[name].rounds = timing.median_ms(s), len(s)
    for name, err in errors.items():
        rows[name].status = f"failed: {err[:150]}"
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=list(W.workloads()), help="repeatable; default: all")
    ap.add_argument("--quick", action="store_true", help="shrunk models and few repeats (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="Markdown results file (default: results/RESULTS.md, "
                    "or results/quick.md with --quick)")
    ap.add_argument("--repeats", type=int, help="exactly this many timed rounds (overrides the adaptive count)")
    ap.add_argument("--min-seconds", type=float, help="measured seconds per method (default 1.0; quick 0.1)")
    ap.add_argument("--no-compile", action="store_true", help="skip every torch.compile row")
    ap.add_argument("--compile", action="store_true", help="keep torch.compile rows in --quick")
    ap.add_argument("--onnx-exporter", choices=["auto", "dynamo", "torchscript"],
                    help="auto (default): dynamo exporter, TorchScript for LSTM or when dynamo fails; "
                    "--quick defaults to torchscript (seconds faster per model)")
    ap.add_argument("--verbose", action="store_true", help="keep torch's compile-time error logs")
    ap.add_argument("--methods", type=parse_methods, default=FAMILIES, metavar="F1,F2,...",
                    help=f"only these row families (comma-separated; default all): {','.join(FAMILIES)}")
    ap.add_argument("--busy", action="store_true", help="time each batch twice: idle, then with one competing "
                    "CPU-bound process (a pure-Python spin started and stopped here); adds the busy tables and, "
                    "per eager quanta row, a ', fit_threads' row (its thread count fitted to the free cores)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(HERE, "results", ("quick" if args.quick else "RESULTS") + ("_busy" if args.busy else "")
                                + ".md")

    warnings.filterwarnings("ignore")
    if not args.verbose:  # a failing fake kernel is logged at ERROR by every recompile; rows say it
        for name in ("torch._subclasses.fake_tensor", "torch._dynamo", "torch._inductor"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.no_compile or (args.quick and not args.compile):
        methods.COMPILE.update(enabled=False, why="--no-compile" if args.no_compile else
                               "--quick (compiles take 10-30 s each; add --compile)")
    peers.EXPORTER["prefer"] = args.onnx_exporter or ("torchscript" if args.quick else "auto")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True  # constant-fold weights: the recommended CPU inference setting

    budget = (dict(min_seconds=0.1, min_rounds=3, max_rounds=5, budget_s=3.0) if args.quick else
              dict(min_seconds=1.0, min_rounds=5, max_rounds=200, budget_s=30.0))
    if args.min_seconds is not None:
        budget.update(min_seconds=args.min_seconds, max_rounds=max(budget["max_rounds"], 200))
    if args.repeats is not None:
        budget.update(min_rounds=args.repeats, max_rounds=args.repeats)
    wls = W.workloads(quick=args.quick)
    names = args.workload or list(wls)
    t_start = time.perf_counter()
    tables = []
    with tempfile.TemporaryDirectory(prefix="quanta_bench_") as workdir:
        for name in names:
            wl = wls[name]
            print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: building", flush=True)
            model = wl.model()
            built = build_methods(wl, model, args.threads, workdir, families=args.methods, fit_threads=args.busy)
            for b in wl.batches:
                print(f"[{time.perf_counter() - t_start:6.1f} s] {name} batch {b}: timing", flush=True)
                rows = bench_batch(wl, model, built, b, budget)
                notes = wl.notes + "".join(f"; {m.name}: {n}" for m in built for n in m.notes)
                t = report.table(f"{name}, batch {b}", notes, rows)
                print("\n" + t, flush=True)
                tables.append(t)
                if args.busy:
                    with busy.competitor() as pid:
                        print(f"[{time.perf_counter() - t_start:6.1f} s] {name} batch {b}: timing beside a "
                              f"spinning process (pid {pid})", flush=True)
                        busy_rows = bench_batch(wl, model, built, b, budget)
                    t = report.table(f"{name}, batch {b}, BUSY: one competing CPU-bound process", notes, busy_rows,
                                     idle={r.method: r.median_ms for r in rows if r.median_ms})
                    print("\n" + t, flush=True)
                    tables.append(t)
            del built, model
            gc.collect()
    total = time.perf_counter() - t_start
    extra = [f"total wall time of this run: {total:.0f} s"] + ([busy.NOTE] if args.busy else [])
    text = report.header(args.threads, args.quick, extra)
    text += "\n" + "\n".join(tables)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(report.header(args.threads, args.quick, [f"total wall time: {total:.0f} s"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
