"""Every conv layer shape of the CNN workloads, quanta's native direct conv vs oneDNN, side by side.

For each distinct 2d convolution a workload's float forward runs (``F.conv2d`` recorded with its
real input shape, so TF "same" padding applied by ``F.pad`` before the conv is seen as the conv
sees it), both kernels run the same uint8 codes with the same 7-bit weight codes (within ±64, the
only weights exact on both kernels without VNNI) and a fused ReLU6 into uint8 codes, each from its
settled form (``ConvPlan.run`` / oneDNN's prepacked call), in interleaved shuffled rounds
(`timing.interleaved`). The native loops of the loaded library are used (`conv_native.conv_isa`:
AVX2 builds have both the dense and the depthwise loops, for weights within ±64).

    python benchmarks/conv_layers_avx2.py --threads 2 --batch 1 --batch 16
    python benchmarks/conv_layers_avx2.py --threads 2 --kind pointwise --batch 1 --batch 8 --batch 16

``--clock thread`` (with ``--threads 1``) times each call by the calling thread's CPU time
(``time.thread_time``) instead of the wall clock: on a machine shared with other processes a
preempted call's wall time counts the other processes' slices, its CPU time does not (ResNet-18's
64-channel 3x3 conv at batch 16, 1 thread, on the 2-core machine under a load average of ~8: 21 ms
of CPU time, 40 ms wall clock at best). More threads would leave the workers' time out, so the
option refuses them.

    python benchmarks/conv_layers_avx2.py --threads 1 --clock thread --workload resnet18 --kind dense --batch 16

A 1x1 convolution without padding (``--kind pointwise``, a subset of ``dense``) also times the
general dense loop it ran before the pointwise loop (``ConvPlan.run_dense_loop``; csrc/conv_pointwise.cpp
is the AVX2 build's pointwise loop), in the same interleaved rounds: column "dense loop".

Prints one row per layer and batch (ms per call: the best and the median of the rounds; the speed
ratio oneDNN / native of the best, the least disturbed call on a shared machine, where a 2-thread
kernel whose second thread is preempted waits a scheduler slice) and the totals per workload and
kind; ``conv_native.prefer_onednn``'s AVX2 table is read from these rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import timing
import torch
import torch.nn.functional as F
import workloads as W

from quanta.kernels import conv_native, native
from quanta.kernels.conv import onednn_call, prepack

#: (in channels, out channels, kernel, stride, padding, dilation, groups, H, W) of one layer
Layer = tuple[int, int, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int, int, int]


def conv_layers(name: str) -> list[Layer]:
    """The distinct 2d convolutions of workload ``name``'s float forward at batch 1 (in order)."""
    wl = W.workloads()[name]
    model, x = wl.model(), wl.input(1)
    seen: dict[Layer, None] = {}
    real = F.conv2d

    def record(inp, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
        if not isinstance(padding, str):
            seen[(inp.shape[1], weight.shape[0], tuple(weight.shape[2:]), pair(stride), pair(padding), pair(dilation),
                  groups, inp.shape[2], inp.shape[3])] = None
        return real(inp, weight, bias, stride, padding, dilation, groups)

    F.conv2d = record
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.conv2d = real
    return list(seen)


def kind_of(layer: Layer) -> str | None:
    cin, cout, _, _, _, _, groups, _, _ = layer
    if groups == 1 and cin % 4 == 0:
        return "dense"
    return "depthwise" if groups == cin == cout else None


def is_pointwise(layer: Layer) -> bool:
    """A 1x1 convolution without padding (the pointwise loop's shapes; any stride)."""
    _, _, k, _, pad, _, groups, _, _ = layer
    return groups == 1 and k == (1, 1) and pad == (0, 0)


def runners(layer: Layer, batch: int) -> dict[str, object]:
    """``{"native": fn, "onednn": fn}`` (native only where this build has the layer's loop; a
    pointwise layer also ``"dense loop"``: the same plan on the general dense loop)."""
    cin, cout, k, stride, pad, dil, groups, h, w = layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, cin, h, w), dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-64, 65, (cout, cin // groups, *k), dtype=torch.int8, generator=gen)
    w_scale, bias = torch.rand(cout, generator=gen) * 0.01 + 1e-3, torch.randn(cout, generator=gen)
    x_scale, x_zp, out_scale, out_zp = 0.02, 7, 0.03, 0
    args = (x_scale, x_zp, weight, w_scale, bias, list(stride), list(pad), list(dil), groups, "relu6", out_scale,
            out_zp)
    fns: dict[str, object] = {}
    if kind_of(layer) in conv_native.ISA_KINDS[conv_native.conv_isa()]:
        plan = conv_native.make_plan(weight, w_scale, bias, x_scale, x_zp, list(stride), list(pad), list(dil),
                                     groups, "relu6", out_scale, out_zp)
        fns["native"] = lambda: plan.run(x)
        if is_pointwise(layer):
            fns["dense loop"] = lambda: plan.run_dense_loop(x)
    packed = prepack(weight, w_scale, x_scale, x_zp, stride, pad, dil, groups, spatial=(h, w))
    call = onednn_call(4, *args, packed)
    fns["onednn"] = lambda: call(x)
    if "native" in fns:  # the same codes from both (oneDNN's rescale may round a code differently)
        diff = (fns["native"]().int() - fns["onednn"]().int()).abs().max().item()
        assert diff <= 1, f"native and oneDNN differ by {diff} codes on {layer}"
    if "dense loop" in fns:
        assert torch.equal(fns["native"](), fns["dense loop"]()), f"pointwise and dense loops differ on {layer}"
    return fns


def _thread_timed(fn, out: list[float]):
    """``fn`` that also appends each call's CPU time of the calling thread (seconds) to ``out``."""
    def run():
        t0 = time.thread_time()
        y = fn()
        out.append(time.thread_time() - t0)
        return y
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", action="append", help="mobilenet_v2, tf_mobile, resnet18 (default: all three)")
    ap.add_argument("--batch", action="append", type=int, help="batch sizes (default: 1 and 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", choices=("depthwise", "dense", "pointwise", "all"), default="all",
                    help="pointwise: the dense 1x1 convs without padding (with the dense loop's column)")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="measured time per kernel and layer")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the calling thread's CPU time per call (needs --threads 1)")
    a = ap.parse_args(argv)
    if a.clock == "thread" and a.threads != 1:
        ap.error("--clock thread counts the calling thread only: use it with --threads 1")
    torch.set_num_threads(a.threads)
    native.ensure(build=True)
    print(f"native conv ISA: {conv_native.conv_isa()}; threads {a.threads}; 7-bit weights, relu6, uint8 out; "
          f"{a.clock} clock")
    print("| workload | layer (Cin->Cout k s p d g HxW) | batch | native ms best / median | oneDNN ms best / median "
          "| native speed (best) | dense loop ms best / median | native / dense loop speed (best) |")
    print("|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for name in a.workload or ["mobilenet_v2", "tf_mobile", "resnet18"]:
        for layer in conv_layers(name):
            kind = kind_of(layer)
            if kind is None or (a.kind == "pointwise" and not is_pointwise(layer)):
                continue
            if a.kind not in ("all", "pointwise") and kind != a.kind:
                continue
            for batch in a.batch or [1, 16]:
                fns = runners(layer, batch)
                cpu: dict[str, list[float]] = {k: [] for k in fns}
                if a.clock == "thread":
                    fns = {k: _thread_timed(f, cpu[k]) for k, f in fns.items()}
                samples, errors = timing.interleaved(fns, min_seconds=a.min_seconds, min_rounds=15, budget_s=20.0)
                if a.clock == "thread":  # (the wall samples include the wrapper: replaced by the CPU times)
                    samples = {k: cpu[k][-len(v):] for k, v in samples.items()}
                if errors:
                    print(f"| {name} | {layer} | {batch} | errors: {errors} |")
                    continue
                ms = {k: 1000.0 * min(v) for k, v in samples.items()}
                med = {k: timing.median_ms(v) for k, v in samples.items()}
                cin, cout, k, s, p, d, g, h, w = layer
                desc = f"{cin}->{cout} {k[0]}x{k[1]} s{s[0]} p{p[0]},{p[1]} d{d[0]} g{g} {h}x{w}"
                nat = ms.get("native")
                cells = [f"{ms[m]:.3f} / {med[m]:.3f}" if m in ms else "-" for m in ("native", "onednn", "dense loop")]
                ratio = f"{ms['onednn'] / nat:.2f}x" if nat else "-"
                vs_dense = f"{ms['dense loop'] / nat:.2f}x" if nat and "dense loop" in ms else "-"
                print(f"| {name} | {desc} | {batch} | {cells[0]} | {cells[1]} | {ratio} | {cells[2]} | {vs_dense} |",
                      flush=True)
                if nat:
                    t = totals[(name, "pointwise" if is_pointwise(layer) else kind, batch)]
                    t[0] += nat
                    t[1] += ms["onednn"]
                    t[2] += ms.get("dense loop", nat)
    print("\n| workload | kind | batch | native ms (sum of best) | oneDNN ms (sum of best) | native speed "
          "| dense loop ms (sum of best) |\n|---|---|---|---|---|---|---|")
    for (name, kind, batch), (nat, dnn, dense) in totals.items():
        print(f"| {name} | {kind} | {batch} | {nat:.2f} | {dnn:.2f} | {dnn / nat:.2f}x | {dense:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
