"""A transformer quantized two ways in one process: its blocks' attention as written (A: the user's
matmul / softmax / matmul in torch) against the fused float attention `quanta.prepare` makes of it
(B: one `quanta.nn.ScaledDotProductAttention` call per block, the native kernel), timed in interleaved
rounds beside torch fp32.

Both are the workload's quanta row (``static_int8``, ``--weight-bits`` 7 by default, the same
calibration batches); A maps ``ScaledDotProductAttention`` to None in the config, which keeps the
user's ops. Prints how far apart the two outputs are (float rounding: the fused attention is not
bit-identical to torch's ops), the SQNR of each against fp32, and the median / best milliseconds.

    python benchmarks/attention_ab.py --workload sentence_encoder --batch 8 --rounds 30
    python benchmarks/attention_ab.py --workload bert --batch 1 --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch
import workloads as W

import quanta
from quanta.analysis.metrics import sqnr_db as sqnr


def build(wl: W.Workload, model: torch.nn.Module, x: torch.Tensor, weight_bits: int, fused: bool) -> torch.nn.Module:
    config = quanta.preset("static_int8", weight_bits=weight_bits)
    if not fused:
        config = dataclasses.replace(config, module_types={**config.module_types, "ScaledDotProductAttention": None})
    return quanta.quantize(copy.deepcopy(model), config, calib_data=wl.calib_data(), example=x, progress=False).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="sentence_encoder", choices=["bert", "sentence_encoder"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--weight-bits", type=int, default=7)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = W.workloads()[args.workload]
    model, x = wl.model().eval(), wl.input(args.batch)
    models = {"fp32": model, "A as written": build(wl, model, x, args.weight_bits, False),
              "B fused": build(wl, model, x, args.weight_bits, True)}
    with torch.inference_mode():
        outs = {name: m(x) for name, m in models.items()}
        fused = sum(isinstance(m, quanta.nn.ScaledDotProductAttention) for m in models["B fused"].modules())
        print(f"B holds {fused} fused attention call(s); A / B outputs max |diff| "
              f"{(outs['A as written'] - outs['B fused']).abs().max().item():.3g}; SQNR vs fp32: "
              f"A {sqnr(outs['fp32'], outs['A as written']):.1f} dB, B {sqnr(outs['fp32'], outs['B fused']):.1f} dB")
        times: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                models[name](x)
                times[name].append(1e3 * (time.perf_counter() - t0))
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{args.workload} batch {args.batch}, {args.threads} threads, {args.rounds} rounds (median / best ms): "
          + "; ".join(f"{n} {med[n]:.2f} / {min(times[n]):.2f}" for n in models)
          + f"; B / A {med['B fused'] / med['A as written']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
