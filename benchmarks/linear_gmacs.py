"""``avx2_gemm`` alone at transformer shapes, in G multiply-adds per second per thread, beside ONNX
Runtime's ``DynamicQuantizeLinear`` + ``MatMulInteger`` (MLAS) on the same shape and weights:
the fused quantize + GEMM + epilogue (``quantized_linear_avx2``), the GEMM on ready codes
(``int8_linear_avx2``), the input quantization alone, ORT.

    python benchmarks/linear_gmacs.py --threads 1 --cpu-time
    python benchmarks/linear_gmacs.py --threads 2 --shapes 1024x384x1536

Interleaved rounds, best round per configuration (noise only adds time). ``--cpu-time`` (one
thread only) times the calling thread's CPU time instead of the wall clock: on a machine other
processes share, that is the kernel's own cost (ORT with one intra-op thread also runs in the
calling thread).
"""

from __future__ import annotations

import argparse
import time

import torch
from linear_breakdown import _ort_session


def _time(fn, reps: int, clock) -> float:
    fn()
    t = clock()
    for _ in range(reps):
        fn()
    return (clock() - t) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=["1024x384x384", "1024x384x1536", "1024x1536x384",
                                                   "128x384x384", "1024x768x768", "128x768x3072"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cpu-time", action="store_true")
    a = p.parse_args()
    if a.cpu_time and a.threads != 1:
        p.error("--cpu-time needs --threads 1 (other threads' time is not the calling thread's)")
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.cpu_time else time.perf_counter
    from quanta.kernels import linear_avx2, native
    native.ensure()
    lib = native.module()
    if not linear_avx2.avx2_gemm_available():
        raise SystemExit("avx2_gemm does not run here (needs an AVX2 build without VNNI)")
    print("| shape [M,K]x[K,N] | fused quantize+GEMM | GEMM on codes | quantize only | ORT MatMulInteger |"
          "\n| --- | ---: | ---: | ---: | ---: |")
    for shape in a.shapes:
        print(_row(*map(int, shape.split("x")), a.threads, a.rounds, clock, lib, linear_avx2))


def _row(m: int, k: int, n: int, threads: int, rounds: int, clock, lib, linear_avx2) -> str:
    """One shape's Markdown row: best interleaved round per configuration."""
    torch.manual_seed(0)
    x = torch.randn(m, k)
    w = torch.randint(-64, 65, (n, k), dtype=torch.int8)
    ap, ws = linear_avx2.avx2_pack(w), w.sum(1, dtype=torch.int32)
    wsc, b, st = torch.rand(n) * 0.01, torch.randn(n), torch.tensor([0.05])
    codes, zp = lib.quantize_static(x, 20.0, 128, 0, 255, False), torch.tensor([128], dtype=torch.int32)
    run = {"fused": lambda: lib.quantized_linear_avx2(x, 20.0, 128, 0, 255, st, ap, ws, wsc, b),
           "codes": lambda: lib.int8_linear_avx2(codes, zp, st, ap, ws, wsc, b),
           "quant": lambda: lib.quantize_static(x, 20.0, 128, 0, 255, False)}
    try:
        sess, xn = _ort_session(k, n, w, threads), x.numpy()
        run["ort"] = lambda: sess.run(None, {"x": xn})
    except ImportError:
        pass
    reps = max(2, int(3e8 / (m * k * n)))
    best = {name: float("inf") for name in run}
    for _ in range(rounds):
        for name, fn in run.items():
            best[name] = min(best[name], _time(fn, reps, clock))

    def cell(name: str) -> str:
        if name not in best:
            return "—"
        ms = best[name]
        return f"{ms:.3f} ms" if name == "quant" else f"{ms:.3f} ms ({m * k * n / ms / 1e6 / threads:.0f} G/s/thr)"
    return f"| {m}x{k}x{n} | {cell('fused')} | {cell('codes')} | {cell('quant')} | {cell('ort')} |"

if __name__ == "__main__":
    main()
