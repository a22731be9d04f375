"""Per conv layer in the whole model: quanta's Int8Conv2d (and the kernel it ran) vs OpenVINO's node.

quanta: the workload's preset (as ``profile_layers.py`` builds it, e.g. ``--weight-bits 7``), each
``Int8Conv2d`` timed by forward hooks over ``--rounds`` calls of the whole model (median per layer);
the kernel column is the binding's choice (``native`` = ``csrc/conv_dense.cpp``'s dense loop, or the
pointwise loop for a 1x1 conv without padding on AVX2; ``onednn``). OpenVINO: NNCF int8 compiled with
``PERF_COUNT``; the executed ``Convolution`` nodes' ``real_time`` (median per node) and ``exec_type``
(the primitive OpenVINO ran, e.g. ``jit_avx2_I8``). Layers are paired by the module path that the
PyTorch frontend writes into OpenVINO's node names (``__module.layer1.0.conv1/...``).

    python benchmarks/conv_layers_vs_openvino.py --workload resnet18 --batch 16 --weight-bits 7 \\
        --preset static_int8 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch
import workloads as W
from profile_layers import quanta_model

from quanta.kernels import conv_native


def conv_key(in_ch: int, out_shape, kernel) -> tuple[int, ...]:
    """(in channels, out channels, output H, W, kernel H, W): what pairs a layer with a node."""
    return (int(in_ch), *(int(v) for v in out_shape[1:4]), *(int(k) for k in kernel))


class QuantaConvs:
    """Hooks timing every Int8Conv2d of ``q`` (execution order, per call) and the kernel it ran."""

    def __init__(self, q: torch.nn.Module) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.desc: dict[str, str] = {}
        self.keys: dict[str, tuple[int, ...]] = {}
        self.convs = {n: m for n, m in q.named_modules() if type(m).__name__ == "Int8Conv2d"}
        self.handles, t0 = [], {}
        for name, mod in self.convs.items():
            def pre(_m, a, name=name):
                t0[name] = time.perf_counter()

            def post(m, a, o, name=name):
                self.samples[name].append((time.perf_counter() - t0[name]) * 1e3)
                if name not in self.keys:
                    k = "x".join(map(str, m.weight.shape[2:]))
                    self.desc[name] = (f"{m.in_channels}->{m.out_channels} {k} s{m.stride[0]} in "
                                       f"{'x'.join(map(str, a[0].shape))}")
                    self.keys[name] = conv_key(m.in_channels, o.shape, m.weight.shape[2:])
            self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def reset(self) -> None:
        self.samples.clear()
        for m in self.convs.values():
            m.binding.counts.clear()

    def kernel(self, name: str) -> str:
        mod = self.convs[name]
        kernel = ",".join(sorted(mod.binding.counts)) or "?"
        if kernel == "native":
            pointwise = conv_native.conv_isa() == "avx2" and conv_native.is_pointwise(mod.weight, mod.padding,
                                                                                      mod.groups)
            kernel = "native pointwise" if pointwise else "native dense"
        return kernel

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class OpenVinoConvs:
    """OpenVINO's NNCF int8 model with ``PERF_COUNT``: per call, its executed Convolution nodes."""

    def __init__(self, wl: W.Workload, model: torch.nn.Module, x: torch.Tensor, threads: int) -> None:
        import openvino as ov
        import peers_openvino as P

        ovm = P.nncf_int8(wl, P.convert(wl, model), wl.calib_data())
        compiled = ov.Core().compile_model(ovm, "CPU", {**P.cpu_config(threads), "PERF_COUNT": True})
        self.request, self.a, self.compiled = compiled.create_infer_request(), x.numpy(), compiled
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.kinds: dict[str, str] = {}
        self.keys: dict[str, tuple[int, ...]] = {}

    def __call__(self) -> None:
        self.request.infer({0: self.a})
        for info in self.request.get_profiling_info():
            if info.status == info.Status.EXECUTED and info.node_type == "Convolution":
                self.samples[info.node_name].append(info.real_time.total_seconds() * 1e3)
                self.kinds[info.node_name] = info.exec_type
        if self.keys:
            return
        for op in self.compiled.get_runtime_model().get_ordered_ops():  # (shapes static after a call)
            if op.get_input_size() > 1 and op.get_output_size():
                i, o, w = (_dims(op.input(0).get_partial_shape()), _dims(op.output(0).get_partial_shape()),
                           _dims(op.input(1).get_partial_shape()))
                if len(i) == 4 and len(o) == 4 and len(w) == 4:
                    self.keys[op.get_friendly_name()] = conv_key(i[1], o, w[2:])


def _dims(shape) -> list[int]:
    return [d.get_length() if d.is_static else -1 for d in shape]


def pair(keys: dict[str, tuple[int, ...]], theirs: dict[str, tuple | None]) -> dict[str, str]:
    """quanta layer -> OpenVINO node: the same `conv_key`, in execution order
    (the frontend's node names do not survive NNCF's rewrite)."""
    free = list(theirs)
    out = {}
    for name, key in keys.items():
        hit = next((n for n in free if theirs[n] == key), None)
        if hit is not None:
            out[name] = hit
            free.remove(hit)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="resnet18", choices=list(W.workloads()))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weight-bits", type=int, default=7)
    ap.add_argument("--preset", default="static_int8")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per layer over the rounds (min: the least disturbed call on a shared machine)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = W.workloads()[args.workload]
    model, x = wl.model(), wl.input(args.batch)
    label, q = quanta_model(wl, model, x, args.weight_bits, args.preset)
    ours, theirs = QuantaConvs(q), OpenVinoConvs(wl, model, x, args.threads)
    try:
        with torch.inference_mode():
            for _ in range(2):  # warm-up: kernel choices, caches
                q(x)
                theirs()
            ours.reset()
            theirs.samples.clear()
            for _ in range(args.rounds):  # interleaved: the same load on both
                q(x)
                theirs()
    finally:
        ours.close()
    stat = min if args.stat == "min" else statistics.median
    ov_ms = {n: stat(v) for n, v in theirs.samples.items()}
    print(f"### {args.workload}, batch {args.batch}, {args.threads} threads: {label} vs OpenVINO int8, {args.stat} ms per layer "
          f"over {args.rounds} interleaved rounds\n")
    print("| layer | shape | quanta kernel | quanta ms | OpenVINO ms | OpenVINO primitive | OpenVINO / quanta |")
    print("|---|---|---|---|---|---|---|")
    tq = tv = 0.0
    pairs = pair(ours.keys, {n: theirs.keys.get(n) for n in ov_ms})
    for name in ours.keys:  # (execution order)
        ms, node = stat(ours.samples[name]), pairs.get(name)
        ov, kind = (ov_ms[node], theirs.kinds[node]) if node else (float("nan"), "?")
        tq += ms
        tv += ov if node else 0.0
        print(f"| {name} | {ours.desc[name]} | {ours.kernel(name)} | {ms:.2f} | {ov:.2f} | {kind} | {ov / ms:.2f}x |")
    print(f"| **all** | | | **{tq:.2f}** | **{tv:.2f}** | | {tv / tq:.2f}x |")
    unpaired = sorted(set(ov_ms) - set(pairs.values()))
    if unpaired:
        print(f"\nOpenVINO nodes without a quanta layer: {unpaired}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
