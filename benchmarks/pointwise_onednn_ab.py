"""A whole model two ways in one process: its 1x1 convs above ``--onednn-above`` outputs on oneDNN (A)
against every conv as ``auto`` settles it (B), timed in interleaved rounds.

How an ``auto`` threshold of `quanta.kernels.conv_native.prefer_onednn` is checked in the model, where a
layer's input comes from the previous layer's output and its output goes to the next: the same float
model is quantized twice (the workload's quanta row, ``--weight-bits`` 7 by default), A with the native
conv's ``prefer`` rule widened for the run, B as shipped; each settles its kernels on a first call, then
the two alternate call by call (the order flips every round). Prints the kernels each model ran, whether
their outputs are equal (oneDNN's rescale is not bit-identical to the reference), and the median / best
milliseconds with B / A.

    python benchmarks/pointwise_onednn_ab.py --workload mobilenet_v2 --batch 16 --rounds 40
    python benchmarks/pointwise_onednn_ab.py --workload resnet18 --batch 16 --rounds 16 --onednn-above 1572864
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch
import workloads as W
from profile_layers import quanta_model

from quanta.kernels import conv as conv_kernels
from quanta.kernels import conv_native


def _onednn_above(limit: int):
    """``prefer_onednn`` widened: also a 1x1 conv without padding of more than ``limit`` outputs."""
    def prefer(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, *rest):
        outputs = 1
        for s in conv_kernels.conv_output_shape(x.shape, weight.shape, stride, padding, dilation):
            outputs *= s
        if conv_native.is_pointwise(weight, padding, groups) and outputs > limit:
            return f"a 1x1 conv of {outputs} outputs (> {limit}: this A/B run's rule)"
        return conv_native.prefer_onednn(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation,
                                         groups, *rest)
    return prefer


def kernels_ran(model: torch.nn.Module) -> dict[str, int]:
    return dict(Counter(k for m in model.modules() for k in getattr(m, "kernel_counts", {})))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mobilenet_v2", choices=list(W.workloads()))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--weight-bits", type=int, default=7)
    ap.add_argument("--onednn-above", type=int, default=1536 * 1024,
                    help="A's rule: 1x1 convs of more outputs than this run oneDNN (default: the retired AVX2 rule)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = W.workloads()[args.workload]
    model, x = wl.model(), wl.input(args.batch)
    impls = conv_kernels.int8_conv.impls
    i = next(k for k, impl in enumerate(impls) if impl.name == "native")
    shipped = impls[i]
    impls[i] = dataclasses.replace(shipped, prefer=_onednn_above(args.onednn_above))
    try:
        a = quanta_model(wl, model, x, args.weight_bits)[1]
        with torch.inference_mode():
            ya = a(x)  # (settles A's kernels under the widened rule)
    finally:
        impls[i] = shipped
    b = quanta_model(wl, model, x, args.weight_bits)[1]
    with torch.inference_mode():
        yb = b(x)
    print(f"A kernels {kernels_ran(a)}; B kernels {kernels_ran(b)}; outputs equal: {torch.equal(ya, yb)}")
    times: dict[str, list[float]] = {"A": [], "B": []}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name, m in ((("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))):
                t0 = time.perf_counter()
                m(x)
                times[name].append(1e3 * (time.perf_counter() - t0))
    ma, mb = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"{args.workload} batch {args.batch}, {args.threads} threads, {args.rounds} rounds: A (1x1 above "
          f"{args.onednn_above} on oneDNN) {ma:.2f} ms, B (auto) {mb:.2f} ms, B / A {mb / ma:.3f}; best "
          f"{min(times['A']):.2f} / {min(times['B']):.2f} ({min(times['B']) / min(times['A']):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
