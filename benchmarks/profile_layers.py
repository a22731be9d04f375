"""Where the time goes, per layer: torch fp32, quanta's integer model and OpenVINO int8 side by side.

    python benchmarks/profile_layers.py --workload bert --quick
    python benchmarks/profile_layers.py --workload tf_mobile --batch 8 --rounds 20
    python benchmarks/profile_layers.py --workload tf_mobile --weight-bits 7 --threads 1

- torch fp32 and quanta (the workload's first preset in run.py, built as run.py builds it): every
  module that does work is timed with forward hooks — leaf modules, quanta's integer modules and
  ``nn.MultiheadAttention`` as units — and every torch call made *between* those modules (the
  attention matmuls and softmax written in a ``forward``, ``F.pad``, ``x + y`` residual adds,
  reshapes, ...) is timed by a ``TorchFunctionMode`` that only looks at calls outside them.
- OpenVINO: the NNCF int8 model of the benchmark (same calibration batches, same CPU settings),
  compiled with ``PERF_COUNT`` on; ``request.get_profiling_info()`` per executed node.

Everything is grouped into the same buckets (linear/matmul, conv, attention, norm, activation,
other) and printed as one Markdown table with the largest items of each bucket, then the sums and
the end-to-end time of each model measured without instrumentation (hooks cost a few µs per
module, so the sums run a little above it). An active ``TorchFunctionMode`` switches PyTorch's
fused ``nn.TransformerEncoderLayer`` / ``MultiheadAttention`` fast path off, so the instrumented
fp32 column of such a model shows the unfused path; its end-to-end row is the real one. Timings on
a shared machine are indicative (``--threads 1`` is steadier when other processes run).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import workloads as W
from torch import nn
from torch.overrides import TorchFunctionMode

BUCKETS = ("linear/matmul", "conv", "attention", "norm", "activation", "other")
_ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "hardtanh", "elu",
                "mish", "softplus", "leakyrelu", "leaky_relu", "swish", "clamp", "clip")
# torch functions called between modules, by name
_FUNCTION_BUCKETS = {
    "linear/matmul": ("linear", "addmm", "mm"),
    "conv": ("conv1d", "conv2d", "conv3d", "convolution"),
    "attention": ("matmul", "bmm", "baddbmm", "softmax", "_softmax", "scaled_dot_product_attention",
                  "_transformer_encoder_layer_fwd", "_native_multi_head_attention"),
    "norm": ("layer_norm", "batch_norm", "group_norm", "normalize", "rms_norm"),
    "activation": _ACTIVATIONS,
}
# OpenVINO CPU-plugin node types
_OV_BUCKETS = {
    "linear/matmul": ("FullyConnected", "FullyConnectedQuantizedLegacy", "FullyConnectedCompressed"),
    "conv": ("Convolution", "GroupConvolution", "Deconvolution", "ConvolutionBackpropData"),
    "attention": ("MatMul", "Softmax", "ScaledDotProductAttention", "SDPA"),
    "norm": ("MVN", "NormalizeL2", "BatchNormInference", "RMS"),
    "activation": ("Gelu", "Relu", "Clamp", "Swish", "Sigmoid", "Tanh", "HSwish", "HSigmoid", "Elu", "Mish",
                   "SoftPlus", "PRelu"),
}


def module_bucket(module: nn.Module) -> str:
    name = type(module).__name__.lower()
    if "attention" in name:
        return "attention"
    if "linear" in name:
        return "linear/matmul"
    if "conv" in name:
        return "conv"
    if "norm" in name:
        return "norm"
    if name.removeprefix("quant") in _ACTIVATIONS or "softmax" in name:
        return "activation"
    return "other"


def function_bucket(name: str) -> str:
    for bucket, names in _FUNCTION_BUCKETS.items():
        if name in names or name.rstrip("_") in names:
            return bucket
    return "other"


def ov_bucket(node_type: str) -> str:
    for bucket, types in _OV_BUCKETS.items():
        if node_type in types:
            return bucket
    return "other"


class Profile:
    """Milliseconds per call, by bucket and by item (``(bucket, item) -> [count, total ms]``)."""

    def __init__(self, label: str) -> None:
        self.label, self.items = label, defaultdict(lambda: [0, 0.0])
        self.calls, self.end_to_end_ms = 0, None

    def add(self, bucket: str, item: str, ms: float) -> None:
        entry = self.items[(bucket, item)]
        entry[0] += 1
        entry[1] += ms

    def bucket_ms(self, bucket: str) -> float:
        return sum(ms for (b, _), (_, ms) in self.items.items() if b == bucket) / max(self.calls, 1)

    def top(self, bucket: str, n: int = 3) -> str:
        rows = sorted(((ms, item, count) for (b, item), (count, ms) in self.items.items() if b == bucket), reverse=True)
        calls = max(self.calls, 1)
        return ", ".join(f"{item} ×{count // calls} {ms / calls:.2f}" for ms, item, count in rows[:n])


def _is_unit(module: nn.Module) -> bool:
    """A module timed as one piece: a leaf, a quanta integer module, or PyTorch's attention."""
    return (not any(True for _ in module.children()) or type(module).__module__.startswith("quanta.integer")
            or isinstance(module, nn.MultiheadAttention))


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if _is_unit(module):
            found.append((prefix or type(module).__name__, module))
            return
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return found


class _Between(TorchFunctionMode):
    """Times every torch call made while no timed module is running (the glue in ``forward``)."""

    def __init__(self, state: dict, profile: Profile) -> None:
        super().__init__()
        self.state, self.profile = state, profile

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["depth"] or not self.state["on"]:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name != "__get__":  # attribute reads (.shape, .dtype)
            self.profile.add(function_bucket(name), f"{name}()", (time.perf_counter() - t0) * 1e3)
        return out


def profile_torch(label: str, model: nn.Module, x: torch.Tensor, rounds: int) -> Profile:
    """Per-unit and between-unit times of ``model(x)``, averaged over ``rounds`` calls."""
    prof, state, handles = Profile(label), {"depth": 0, "on": False, "t0": 0.0}, []

    def pre(_m, _a):
        if state["depth"] == 0:
            state["t0"] = time.perf_counter()
        state["depth"] += 1

    def post_for(module: nn.Module) -> Callable:
        bucket, item = module_bucket(module), type(module).__name__

        def post(_m, _a, _o):
            state["depth"] -= 1
            if state["depth"] == 0 and state["on"]:
                prof.add(bucket, item, (time.perf_counter() - state["t0"]) * 1e3)
        return post

    for _, mod in _units(model):
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post_for(mod))]
    try:
        with torch.inference_mode(), _Between(state, prof):
            for _ in range(2):
                model(x)  # warm-up (kernel choice, caches)
            state["on"] = True
            for _ in range(rounds):
                model(x)
            prof.calls = rounds
    finally:
        for h in handles:
            h.remove()
    prof.end_to_end_ms = _median_ms(lambda: model(x), rounds)
    return prof


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    with torch.inference_mode():
        fn()
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def profile_openvino(wl: W.Workload, model: nn.Module, x: torch.Tensor, threads: int, rounds: int) -> Profile:
    """OpenVINO int8 (NNCF, as the benchmark row) with ``PERF_COUNT``: executed nodes by type."""
    import openvino as ov
    import peers_openvino as P

    q = P.nncf_int8(wl, P.convert(wl, model), wl.calib_data())
    compiled = ov.Core().compile_model(q, "CPU", {**P.cpu_config(threads), "PERF_COUNT": True})
    request, a = compiled.create_infer_request(), x.numpy()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    prof = Profile(f"OpenVINO int8 (runs in {getattr(precision, 'get_type_name', lambda: precision)()})")
    for _ in range(2):
        request.infer({0: a})
    for _ in range(rounds):
        request.infer({0: a})
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                prof.add(ov_bucket(info.node_type), info.node_type, info.real_time.total_seconds() * 1e3)
    prof.calls = rounds
    prof.end_to_end_ms = _median_ms(lambda: request.infer({0: a}), rounds)
    return prof


def quanta_model(wl: W.Workload, model: nn.Module, x: torch.Tensor,
                 weight_bits: int | None = None, preset: str | None = None) -> tuple[str, nn.Module]:
    """The workload's quanta preset (default its first one in ``run.py``), built as ``run.py``
    builds its row (``weight_bits``: that preset option, e.g. 7, whose codes oneDNN sums exactly on
    CPUs without VNNI)."""
    from run import QUANTA_PRESETS

    import quanta

    preset, kwargs = (preset, dict(QUANTA_PRESETS[wl.kind]).get(preset, {})) if preset else QUANTA_PRESETS[wl.kind][0]
    config = quanta.preset(preset, weight_bits=weight_bits) if weight_bits else preset
    src = copy.deepcopy(model)
    q = quanta.quantize(src, config, calib_data=wl.calib_data(), example=x, progress=False, **kwargs).eval()
    results = [r.result for r in quanta.conversion_report(q)]
    kept = len(results) - sum(r not in ("float", "simulated") for r in results)
    bits = f" weight_bits={weight_bits}" if weight_bits else ""
    return f"quanta {preset}{bits} ({len(results) - kept} integer, {kept} float/simulated)", q


def table(title: str, profiles: list[Profile]) -> str:
    head = "| bucket | " + " | ".join(f"{p.label} ms" for p in profiles) + " | " + \
        " | ".join(f"{p.label.split(' (')[0]}: largest (×count ms)" for p in profiles[1:]) + " |"
    out = [f"### {title}", "", head, "|---" * (1 + 2 * len(profiles) - 1) + "|"]
    for b in BUCKETS:
        out.append(f"| {b} | " + " | ".join(f"{p.bucket_ms(b):.2f}" for p in profiles) + " | "
                   + " | ".join(p.top(b) or "—" for p in profiles[1:]) + " |")
    out.append("| **sum of layers** | " + " | ".join(f"**{sum(p.bucket_ms(b) for b in BUCKETS):.2f}**"
                                                     for p in profiles) + " |" + " |" * (len(profiles) - 1))
    out.append("| end-to-end (no instrumentation) | " + " | ".join(f"{p.end_to_end_ms:.2f}" for p in profiles)
               + " |" + " |" * (len(profiles) - 1))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=list(W.workloads()))
    ap.add_argument("--batch", type=int, help="batch size (default: the workload's smallest)")
    ap.add_argument("--quick", action="store_true", help="the --quick (shrunk) size of the workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="profiled calls per model (default 10)")
    ap.add_argument("--weight-bits", type=int, help="the quanta preset's weight_bits option (e.g. 7)")
    ap.add_argument("--preset", help="the quanta preset (default: the workload's first in run.py)")
    ap.add_argument("--no-openvino", action="store_true", help="leave the OpenVINO column out")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be positive")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = W.workloads(quick=args.quick)[args.workload]
    batch = args.batch or min(wl.batches)
    model, x = wl.model(), wl.input(batch)

    profiles = [profile_torch("torch fp32", model, x, args.rounds)]
    label, q = quanta_model(wl, model, x, args.weight_bits, args.preset)
    profiles.append(profile_torch(label, q, x, args.rounds))
    note = ""
    if not args.no_openvino:
        try:
            profiles.append(profile_openvino(wl, model, x, args.threads, args.rounds))
        except ImportError as e:
            note = f"\nOpenVINO column left out: {e}\n"
    title = f"{args.workload}{' (quick)' if args.quick else ''}, batch {batch}, {args.threads} threads: ms per call"
    text = table(title, profiles) + note
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
