"""The native int8 gemv against its alternatives at a few rows, and the two decode-style
workloads it serves (the benchmark's LSTM and 4 x Linear(4096) at one token), interleaved.

    python benchmarks/gemv_avx2.py --threads 2                 # both parts
    python benchmarks/gemv_avx2.py --threads 2 --part kernels  # the row threshold only

Part ``kernels``: per weight shape and row count M, median ms of ``int8_linear`` with
``gemv_native`` (the build's loop: AVX-512 VNNI or AVX2 ``vpmaddwd``), the exact alternative the
guards take without it (``float_sums`` without VNNI, else ``int_mm_swapped`` / ``int_mm_native``)
and fp32 ``F.linear``: where gemv stops winning is `quanta.kernels.gemv_rows`' threshold.
Part ``models``: fp32 vs ``quanta.quantize(..., "dynamic_int8", example=x)`` (the speed check
on) for each workload: which kernels ran and which layers the speed check kept float.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, median_ms
from workloads import LinearStack, LSTMModel

import quanta
from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.gemv_rows import gemv_isa

SHAPES = [(4096, 4096), (2048, 512), (3072, 768), (768, 768)]  # (N, K)
ROWS = [1, 2, 4, 8, 16, 32]


def _alternative() -> str:
    impls = L.int8_linear.available_impls()
    return "float_sums" if "float_sums" in impls else "int_mm_native"


def _stat(kind: str):
    """median (the benchmark's), or min: the least disturbed call on a shared machine"""
    return median_ms if kind == "median" else (lambda s: 1000.0 * min(s))


def kernels(seconds: float, stat=median_ms) -> None:
    alt = _alternative()
    print(f"gemv loop: {gemv_isa()}; alternative: {alt}; threads {torch.get_num_threads()}")
    print(f"{'N x K':>11} {'M':>3} {'gemv ms':>8} {alt + ' ms':>14} {'fp32 ms':>8}  gemv/alt  gemv/fp32")
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = L.streaming_copy(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g))
        wf = torch.randn(n, k, generator=g)
        ws, sw, b = L.weight_sum(w), torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
        for m in ROWS:
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            xf = torch.randn(m, k, generator=g)
            args = (x, torch.rand(m, generator=g), torch.zeros(m, dtype=torch.int32), w, sw, b, ws, None)
            assert torch.equal(L._int8_linear_gemv_native(*args), L.int8_linear(*args, impl="reference"))
            fns = {"gemv": lambda a=args: L._int8_linear_gemv_native(*a),
                   "alt": lambda a=args: L.int8_linear(*a, impl=alt),
                   "fp32": lambda xf=xf, wf=wf, b=b: F.linear(xf, wf, b)}
            samples, errors = interleaved(fns, min_seconds=seconds, budget_s=20 * seconds)
            ms = {name: stat(s) for name, s in samples.items()}
            print(f"{n:>5} x {k:<5} {m:>3} {ms['gemv']:8.3f} {ms['alt']:14.3f} {ms['fp32']:8.3f}  "
                  f"{ms['gemv'] / ms['alt']:8.2f}  {ms['gemv'] / ms['fp32']:9.2f}", flush=True)


def models(seconds: float, stat=median_ms) -> None:
    cases = {"lstm (2 x 512, seq 64, batch 1)": (LSTMModel(), torch.randn(1, 64, 512)),
             "linear_stack (4 x 4096, 1 token)": (LinearStack(), torch.randn(1, 4096))}
    for name, (model, x) in cases.items():
        torch.manual_seed(0)
        model.eval()
        q = quanta.quantize(copy.deepcopy(model), "dynamic_int8", example=x, progress=False).eval()
        kept = quanta.kept_float(q)
        with torch.no_grad():
            q(x)
            ran = sorted({k for m in q.modules() for k in getattr(m, "kernel_counts", {})})
            samples, _ = interleaved({"fp32": lambda m=model, x=x: m(x), "quanta": lambda q=q, x=x: q(x)}, min_seconds=seconds,
                                     budget_s=30 * seconds)
        fp, qa = stat(samples["fp32"]), stat(samples["quanta"])
        print(f"{name}: fp32 {fp:.2f} ms, quanta dynamic_int8 {qa:.2f} ms ({fp / qa:.2f}x); kernels {ran}; "
              f"kept float by the speed check: {[k.describe() for k in kept] or 'none'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=["kernels", "models", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=0.5, help="measured time per method and case (min)")
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    native.ensure()  # (the first use in this environment builds it)
    if a.part in ("kernels", "both"):
        kernels(a.seconds, _stat(a.stat))
    if a.part in ("models", "both"):
        models(a.seconds, _stat(a.stat))


if __name__ == "__main__":
    main()
