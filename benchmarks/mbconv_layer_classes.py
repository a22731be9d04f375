"""Where a MobileNet's convolution time goes, by layer class: quanta vs OpenVINO int8.

    python benchmarks/mbconv_layer_classes.py --workload tf_mobile --batch 8 --weight-bits 7
    python benchmarks/mbconv_layer_classes.py --workload mobilenet_v2 --batch 16 --weight-bits 7

Every convolution is put in one class: ``expand 1x1`` (more outputs than inputs), ``project 1x1``
(fewer), ``depthwise 3x3 s1`` / ``s2``, ``other`` (the stem, the last 1x1, anything else), and
for quanta also by the kernel that ran it (native loop or oneDNN). quanta: forward hooks on the
integer conv modules (median per layer over ``--rounds`` calls); OpenVINO: ``PERF_COUNT`` per
executed node, classified from the runtime model's shapes. Timings on a shared machine are
indicative: compare classes, not lone totals.
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
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import workloads as W
from profile_layers import quanta_model

CLASSES = ("expand 1x1", "depthwise 3x3 s1", "depthwise 3x3 s2", "project 1x1", "other")


def conv_class(c_in: int, c_out: int, kernel: tuple[int, ...], groups: int, stride: int) -> str:
    if groups > 1 and groups == c_in == c_out and kernel == (3, 3):
        return f"depthwise 3x3 s{stride}"
    if groups == 1 and kernel == (1, 1) and c_in >= 16 and c_out != 1280 and c_out != 1024:
        return "expand 1x1" if c_out > c_in else "project 1x1"
    return "other"


def profile_quanta(q: torch.nn.Module, x: torch.Tensor, rounds: int,
                   layers: list[tuple[str, torch.nn.Module, str, float]] | None = None) -> dict[str, float]:
    """Median ms per call of each class's layers (summed) and end to end; ``layers``: filled with
    each conv's (name, module, class, median ms)."""
    times: dict[str, list[float]] = defaultdict(list)
    classes: dict[str, str] = {}
    mods: dict[str, torch.nn.Module] = {}
    handles, t0 = [], {}
    for name, mod in q.named_modules():
        if "conv" not in type(mod).__name__.lower() or not hasattr(mod, "weight") and not hasattr(mod, "in_channels"):
            continue
        if any(True for _ in mod.children()) and not type(mod).__module__.startswith("quanta.integer"):
            continue
        w = getattr(mod, "weight", None)
        k = tuple(w.shape[2:]) if w is not None and hasattr(w, "shape") else tuple(getattr(mod, "kernel_size", ()))
        stride = mod.stride[0] if isinstance(mod.stride, (tuple, list)) else int(mod.stride)
        classes[name] = conv_class(mod.in_channels, mod.out_channels, k, mod.groups, stride)
        mods[name] = mod
        handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: t0.__setitem__(n, time.perf_counter())))
        handles.append(mod.register_forward_hook(
            lambda _m, _a, _o, n=name: times[n].append(1e3 * (time.perf_counter() - t0[n]))))
    with torch.inference_mode():
        for _ in range(2):
            q(x)
        times.clear()
        for _ in range(rounds):
            q(x)
    for h in handles:
        h.remove()
    with torch.inference_mode():
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            q(x)
            samples.append(1e3 * (time.perf_counter() - start))
    out: dict[str, float] = defaultdict(float)
    for name, ts in times.items():
        out[classes[name]] += statistics.median(ts)
        if layers is not None:
            layers.append((name, mods[name], classes[name], statistics.median(ts)))
    out["end-to-end"] = statistics.median(samples)
    return out


def profile_openvino(wl: W.Workload, model: torch.nn.Module, x: torch.Tensor, threads: int,
                     rounds: int) -> dict[str, float]:
    import openvino as ov
    import peers_openvino as P

    q = P.nncf_int8(wl, P.convert(wl, model), wl.calib_data())
    compiled = ov.Core().compile_model(q, "CPU", {**P.cpu_config(threads), "PERF_COUNT": True})
    # OpenVINO fuses each conv with its BN / activation / quantization and renames it; its
    # executed convolutions, in execution order, are the torch model's (a MobileNet runs its convs
    # in definition order)
    convs = [mod for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    ops = [op for op in compiled.get_runtime_model().get_ops()
           if op.get_rt_info()["layerType"].value in ("Convolution", "GroupConvolution")]
    ops.sort(key=lambda op: int(op.get_rt_info()["execOrder"].value))
    if len(ops) != len(convs):
        raise SystemExit(f"OpenVINO runs {len(ops)} convolutions, the model has {len(convs)}")
    shapes = {op.get_friendly_name(): conv_class(c.in_channels, c.out_channels, tuple(c.kernel_size), c.groups,
                                                 c.stride[0]) for op, c in zip(ops, convs)}
    request, a = compiled.create_infer_request(), x.numpy()
    for _ in range(2):
        request.infer({0: a})
    per: dict[str, list[float]] = defaultdict(list)
    cls: dict[str, str] = {}
    for _ in range(rounds):
        request.infer({0: a})
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                per[info.node_name].append(info.real_time.total_seconds() * 1e3)
                cls[info.node_name] = shapes.get(info.node_name, "other" if info.node_type in (
                    "Convolution", "GroupConvolution") else "non-conv")
    out: dict[str, float] = defaultdict(float)
    for name, ts in per.items():
        out[cls[name]] += statistics.median(ts)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        request.infer({0: a})
        samples.append(1e3 * (time.perf_counter() - start))
    out["end-to-end"] = statistics.median(samples)
    return out


def scaling(q: torch.nn.Module, small: torch.Tensor, large: torch.Tensor, rounds: int, workload: str) -> int:
    runs: dict[int, list[dict[str, float]]] = {len(small): [], len(large): []}
    for _ in range(rounds):  # interleaved: small, large, small, large, ...
        for x in (small, large):
            runs[len(x)].append(profile_quanta(q, x, 3))
    b1, b2 = len(small), len(large)
    print(f"### {workload}: quanta ms per image, batch {b1} vs batch {b2} (medians of {rounds} interleaved rounds)")
    print(f"| class | batch {b1} | batch {b2} | batch {b2} / batch {b1} |\n|---|---|---|---|")
    for c in (*CLASSES, "end-to-end"):
        a, b = (statistics.median(r.get(c, 0.0) for r in runs[n]) / n for n in (b1, b2))
        print(f"| {c} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f} |")
    return 0


def print_layers(layers: list[tuple[str, torch.nn.Module, str, float]]) -> None:
    """Each conv: its shape, the kernel that ran it (`kernel_counts`: native loop or oneDNN) and its
    median ms; the native kind as `conv_native` names it (pointwise 1x1, gathered C % 4 != 0, dense,
    depthwise)."""
    from quanta.kernels.conv_native import is_pointwise

    print("| layer | class | conv | kernel | ms |\n|---|---|---|---|---|")
    for name, mod, cls, ms in layers:
        ran = "/".join(sorted(getattr(mod, "kernel_counts", {}) or {"?": 0}))
        if ran == "native":
            w = mod.weight
            ran = ("native depthwise" if mod.groups > 1 else "native gathered" if mod.in_channels % 4
                   else "native pointwise" if is_pointwise(w, mod.padding, mod.groups) else "native dense")
        shape = (f"{mod.in_channels}->{mod.out_channels} k{'x'.join(map(str, mod.kernel_size))} "
                 f"s{mod.stride[0]} g{mod.groups}")
        print(f"| {name} | {cls} | {shape} | {ran} | {ms:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=list(W.workloads()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--weight-bits", type=int, default=7)
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--per-layer", action="store_true", help="also each conv's shape, kernel and median ms")
    ap.add_argument("--scaling", type=int, metavar="B1",
                    help="instead: quanta's ms per image per class at batch B1 vs --batch, interleaved rounds "
                         "(a class whose per-image time grows with the batch pays memory traffic)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = W.workloads()[args.workload]
    model, x = wl.model(), wl.input(args.batch)
    _, q = quanta_model(wl, model, x, args.weight_bits)
    if args.scaling:
        return scaling(q, wl.input(args.scaling), x, args.rounds, args.workload)
    layers: list[tuple[str, torch.nn.Module, str, float]] = []
    qt = profile_quanta(q, x, args.rounds, layers)
    if args.per_layer:
        print_layers(layers)
    ov = {} if args.no_openvino else profile_openvino(wl, model, x, args.threads, args.rounds)
    print(f"### {args.workload}, batch {args.batch}, {args.threads} threads: ms per call (median per layer, summed)")
    print("| class | quanta | OpenVINO | quanta / OpenVINO |\n|---|---|---|---|")
    for c in (*CLASSES, "non-conv", "end-to-end"):
        a, b = qt.get(c, 0.0), ov.get(c, 0.0)
        print(f"| {c} | {a:.2f} | {b:.2f} | {a / b if b else float('nan'):.2f} |")
    sums = [sum(v for k, v in d.items() if k != "end-to-end") for d in (qt, ov)]
    print(f"| **sum of layers** | {sums[0]:.2f} | {sums[1]:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
