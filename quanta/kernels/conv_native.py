"""``int8_conv``'s ``native`` implementation: quanta's own direct int8 convolution (``csrc/conv.cpp``).

oneDNN's ``qconv_pointwise`` costs about 30 µs a call before any arithmetic (measured on a
16-channel 1x1 convolution of one pixel), which is most of the time of a MobileNet-style
network's small pointwise and depthwise layers at batch 1 (52 convolutions). The native kernel
runs from a `ConvPlan` that holds everything but the input, so a call costs the kernel.

Covered: 1d and 2d convolutions of uint8 / int8 codes, any kernel, stride, padding and
dilation, with

- ``groups == 1`` and a multiple of 4 input channels (*dense*: an output tile of 6 pixels × 64
  channels accumulates with ``vpdpbusd``, 4 input channels per instruction), or
- ``groups == 1`` and other channel counts (*gathered*, the AVX2 build only: each output pixel's
  taps gathered into one row of round_up(taps × C, 4) codes, then the pointwise GEMM), or
- ``groups == C == O`` (*depthwise*: 4 taps' inputs of 64 channels interleaved in registers, so
  that ``vpdpbusd`` adds 4 taps of 16 channels per instruction; a last group of at most 32 / 16
  channels on 256- / 128-bit vectors; 3x3 and 5x5 kernels with compile-time taps and the weights
  in registers for the pixels whose taps lie inside the image's columns).

Exact: the integer sums are the reference's, and the epilogue is the reference's own float32
arithmetic (``float32(acc) · float32(x_scale · w_scale) + bias``, post-op, requantization), so
outputs equal the reference bit for bit (oneDNN's rescale rounds differently, by a few ulps).
Needs the native library built with AVX-512 VNNI (`conv_isa` ``"avx512_vnni"``: any int8 weight)
or AVX2 (``"avx2"``: 256-bit vectors, with ``vpmaddubsw`` + ``vpmaddwd`` in place of ``vpdpbusd``:
exact only for weights within ±64, e.g. ``weight_bits=7``, so the guard refuses wider ones; dense
tiles of 4 pixels × 16 channels, depthwise groups as two 256-bit halves; 1x1 convolutions without
padding, any stride, run the *pointwise* loop, ``csrc/conv_pointwise.cpp``: a GEMM of 6-pixel ×
16-channel register tiles over the same packed weights, with the same epilogue); 3d convolutions
and other groupings run on oneDNN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import native
from .conv_shapes import conv_output_shape
from .post_ops import CLAMP_POST_OPS, codes_for
from .u8s8_saturation import SEVEN_BIT_MAX, weight_code_max

_POST = codes_for(CLAMP_POST_OPS)  # csrc/post_op.h
#: largest |x - zp| · |w| of one product (as in conv.py): sums of up to 2^31 / this many fit int32
_MAX_PRODUCT = 255 * 128


def conv_isa() -> str:
    """The direct convolution's loops in the loaded library: ``"avx512_vnni"`` (any int8 weight),
    ``"avx2"`` (weights within ±64) or ``"none"`` (also: no library)."""
    return str(native.module().conv_isa()) if native.ready() else "none"


#: the kinds of convolution each ISA's build has a loop for
ISA_KINDS = {"avx512_vnni": ("dense", "depthwise"), "avx2": ("dense", "depthwise", "gathered"), "none": ()}


def native_available() -> bool:
    return conv_isa() != "none"


def native_limits() -> str | None:
    """What this build's loops leave out, in words (`quanta doctor`), or None (VNNI: nothing)."""
    isa = conv_isa()
    if isa != "avx2":
        return None
    return (f"AVX2 build: weights within ±{SEVEN_BIT_MAX} only (7-bit, weight_bits=7); without VNNI wider "
            "weights saturate vpmaddubsw")


def _kind(x_channels: int, weight: torch.Tensor, groups: int) -> str | None:
    """``"dense"``, ``"depthwise"``, ``"gathered"`` (groups = 1 with C % 4 != 0, e.g. a 3-channel stem: the
    AVX2 build gathers each output pixel's taps into one row, then runs the pointwise GEMM), or None
    when the native kernel has no loop for the grouping."""
    if groups == 1 and x_channels % 4 == 0:
        return "dense"
    if groups == x_channels == weight.shape[0] and weight.shape[1] == 1:
        return "depthwise"
    return "gathered" if groups == 1 else None


def guard_native(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
                 packed: torch.Tensor | None) -> str | None:
    if x.device.type != "cpu":
        return f"runs on CPU, got {x.device}"
    if x.dtype not in (torch.uint8, torch.int8) or weight.dtype != torch.int8:
        return f"needs uint8/int8 activations and int8 weights, got {x.dtype} / {weight.dtype}"
    if x.dim() not in (3, 4):
        return f"has 1d and 2d loops, got a {x.dim()}d input"
    if x.numel() == 0:
        return "empty input"
    if weight.dim() != x.dim() or _kind(x.shape[1], weight, groups) is None:
        return (f"needs groups=1 or a depthwise conv; got groups={groups} with {x.shape[1]} input channels")
    if weight[0].numel() * _MAX_PRODUCT >= 2**31:
        return f"a reduction of {weight[0].numel()} products may overflow the int32 accumulator"
    if post_op not in _POST:
        return f"post_op {post_op!r} is not supported"
    isa = conv_isa()
    kind = _kind(x.shape[1], weight, groups)
    if kind not in ISA_KINDS[isa]:
        return f"this CPU's build ({isa}) has no {kind} loop" + (
            " (its dense loop needs a multiple of 4 input channels)" if kind == "gathered" else "")
    if isa != "avx512_vnni":
        peak = weight_code_max(weight)
        if peak < 0:
            return "weight codes never measured outside torch.compile (without VNNI their bound decides exactness)"
        if peak > SEVEN_BIT_MAX:
            return (f"weights wider than ±{SEVEN_BIT_MAX} (8-bit, up to ±{peak}) saturate vpmaddubsw pair sums "
                    f"without VNNI; 7-bit weights (weight_bits=7) run exactly")
    return None


#: measured side by side on a 2-core AVX-512 VNNI CPU (every MobileNetV2 / ResNet-18 layer with
#: its real codes, batch 1 and 16, alone and then in the whole model): oneDNN's JIT kernel costs
#: ~20-30 µs more per call but is faster per output element on large outputs of short sums (batch
#: 16: 32 channels 1x1 onto 16 at 112x112, 0.64 vs 1.29 ms alone). Depthwise 3x3 and 5x5 convs run
#: the native loop's interior runs (compile-time taps, weights in registers) and beat oneDNN on
#: every MobileNetV2 depthwise layer (batch 16: 1.0x on 32 channels at 112x112, 1.2-1.7x on the
#: others; batch 1: 1.4-3.2x); other depthwise kernels run the native tiles alone, which were
#: 0.5-0.9x of oneDNN on large outputs.
PREFER_ONEDNN_OUTPUTS = 2 * 1024 * 1024
PREFER_ONEDNN_REDUCTION = 64
PREFER_ONEDNN_DEPTHWISE_OUTPUTS = 512 * 1024
#: depthwise kernels with the native loop's interior runs (conv_depthwise.cpp, ``run_loop``)
DEPTHWISE_RUN_KERNELS = ((3, 3), (5, 5))
#: the AVX2 build (no VNNI; 7-bit weights), measured side by side on a shared 2-core AMD EPYC with
#: benchmarks/conv_layers_avx2.py (every MobileNetV2 / TF-MobileNet / ResNet-18 layer, batch 1 and
#: 16, 2 threads, best of interleaved rounds): the depthwise loop beat oneDNN on every 3x3 layer
#: (batch 1: 1.8-5.5x; batch 16: 1.2-4.3x). The dense loop (4 pixels x 16 channels, vpmaddubsw)
#: saves oneDNN's per-call cost: faster up to ~160 K outputs (batch 1 from 28x28 down: 1.2-3.4x)
#: and on long sums (ResNet-18's 3x3 convs of 64-512 channels; rerun idle at 17:27 UTC: batch 1
#: 1.16-1.32x, batch 16 1.03-1.18x, 1x1 sums of 576 / 960 at batch 16 1.0x), slower on large outputs
#: of shorter sums (batch 16 1x1 convs of <= 384 channels, and batch 1 at 56x56 / 112x112: 0.5-0.9x).
AVX2_DENSE_NATIVE_OUTPUTS = 160 * 1024
AVX2_DENSE_NATIVE_REDUCTION = 576
# The AVX2 build's pointwise loop (1x1 convs without padding, csrc/conv_pointwise.cpp) runs every 1x1
# conv at every size. Measured the same way on every MobileNetV2 / TF-MobileNet 1x1 layer (batch 1, 8,
# 16; alone: 1.0-1.8x the dense loop, 1.01-1.55x oneDNN), and in the whole model on the idle 2-core EPYC
# (2 threads, the same quantized model settled twice in one process, interleaved, 2026-12-07, after the
# epilogue's conversion became its rounding: NearestRounding in conv_kernels.h): every 1x1 conv native
# vs those above 1.5 M outputs on oneDNN (the rule before), medians MobileNetV2 b8 0.97x, b16 0.94x,
# TF-MobileNet b8 0.96x, ResNet-18 b16 0.98x (one layer). That rule came from runs under load; and
# oneDNN's float32 rescale is not bit-identical to the reference (ties of ~1e-6 of the codes).
# The AVX2 build's gathered loop (dense convs of C % 4 != 0 channels: MobileNets' 3-channel stem) runs
# at every size: in a small quantized model (stem + 1x1), interleaved with the same stem settled on
# oneDNN on a heavily loaded 2-core EPYC, it was level (batch 1: 1.03x oneDNN; batch 16: 0.97x, min of
# 20 rounds), and unlike oneDNN's rescale its outputs equal the reference bit for bit.


def is_pointwise(weight: torch.Tensor, padding: Sequence[int], groups: int) -> bool:
    """A dense 1x1 convolution without padding (any stride): the AVX2 build's pointwise loop."""
    return groups == 1 and all(k == 1 for k in weight.shape[2:]) and all(int(p) == 0 for p in padding)


def prefer_onednn(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, post_op: str, out_scale: float | None,
                  out_zero_point: int, packed: torch.Tensor | None) -> str | None:
    """Why oneDNN is faster for these inputs (see `PREFER_ONEDNN_OUTPUTS`; AVX2 builds:
    `AVX2_DENSE_NATIVE_OUTPUTS`; 1x1 convs and the gathered kind always native), or None."""

    reduction = weight[0].numel()
    outputs = 1
    for s in conv_output_shape(x.shape, weight.shape, stride, padding, dilation):
        outputs *= s
    kernel = tuple(weight.shape[2:])
    if groups > 1 and kernel not in DEPTHWISE_RUN_KERNELS and outputs > PREFER_ONEDNN_DEPTHWISE_OUTPUTS:
        return (f"a depthwise conv of {outputs} outputs with a {'x'.join(map(str, kernel))} kernel (no native "
                f"interior-run loop): oneDNN's kernel is faster there")
    if conv_isa() == "avx2":  # (its own table: depthwise 3x3 / 5x5 native at every size)
        if groups == 1 and x.shape[1] % 4:  # the gathered loop, at every size (see above)
            return None
        if is_pointwise(weight, padding, groups):  # the pointwise loop, at every size (see above)
            return None
        if groups == 1 and outputs > AVX2_DENSE_NATIVE_OUTPUTS and reduction < AVX2_DENSE_NATIVE_REDUCTION:
            return (f"a dense conv of {outputs} outputs of {reduction}-product sums on the AVX2 build (no VNNI): "
                    f"oneDNN's kernel is faster above {AVX2_DENSE_NATIVE_OUTPUTS} outputs of sums shorter than "
                    f"{AVX2_DENSE_NATIVE_REDUCTION}")
        return None
    if outputs > PREFER_ONEDNN_OUTPUTS and reduction < PREFER_ONEDNN_REDUCTION:
        return f"{outputs} outputs of {reduction}-product sums: oneDNN's kernel is faster there"
    return None


def pack_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The int8 weight ``[O, C / groups, *kernel]`` in the layout `ConvPlan` reads (zero weights
    pad the channels and taps):

    - dense ``[O/16, taps, C/4, 16, 4]``: 64 bytes = 16 output channels × 4 input channels;
    - depthwise ``[C/64, taps/4, 4, 64]``: for 64 channels and 4 taps, vector ``k`` holds in int32
      lane ``4 l + i`` the 4 taps' weights of channel ``16 l + 4 k + i`` (the order in which the
      kernel interleaves the 4 taps' inputs; a last group of at most 32 or 16 channels runs on
      256- or 128-bit vectors, which read the first lanes);
    - gathered (groups = 1, C % 4 != 0) ``[O/16, 1, K4/4, 16, 4]``: the reduction K = taps × C in
      (ky, kx, c) order (a gathered row of a channels-last pixel's taps), zero weights up to K4."""
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    taps = weight[0, 0].numel()
    if kind == "gathered":  # [O, C, T] -> [O, T, C] = [O, K] -> [O16/16, 16, K4/4, 4] -> [O16/16, 1, K4/4, 16, 4]
        o16, k, k4 = -(-out_ch // 16) * 16, taps * in_ch, -(-(taps * in_ch) // 4) * 4
        w = torch.zeros(o16, k4, dtype=torch.int8)
        w[:out_ch, :k] = weight.reshape(out_ch, in_ch, taps).transpose(1, 2).reshape(out_ch, k)
        return w.view(o16 // 16, 16, k4 // 4, 4).permute(0, 2, 1, 3).unsqueeze(1).contiguous()
    if kind == "dense":  # [O16, C, T] -> [O16/16, 16, C/4, 4, T] -> [O16/16, T, C/4, 16, 4]
        o16 = -(-out_ch // 16) * 16
        w = torch.zeros(o16, in_ch, taps, dtype=torch.int8)
        w[:out_ch] = weight.reshape(out_ch, in_ch, taps)
        return w.view(o16 // 16, 16, in_ch // 4, 4, taps).permute(0, 4, 2, 1, 3).contiguous()
    c64, t4 = -(-out_ch // 64) * 64, -(-taps // 4) * 4
    w = torch.zeros(c64, t4, dtype=torch.int8)
    w[:out_ch, :taps] = weight.reshape(out_ch, taps)
    # channel g*64 + 16 l + 4 k + i, tap 4 q + j  ->  [g, q, k, (l, i, j)]
    w = w.view(c64 // 64, 4, 4, 4, t4 // 4, 4).permute(0, 4, 2, 1, 3, 5)
    return w.reshape(c64 // 64, t4 // 4, 4, 64).contiguous()


def make_plan(weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float,
              x_zero_point: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              groups: int, post_op: str, out_scale: float | None, out_zero_point: int) -> object:
    """A native ``ConvPlan`` for uint8 codes on ``(x_scale, x_zero_point)`` (a 1d convolution
    as a 2d one of unit height). A 2d depthwise conv's ``padding`` may hold 4 values, before H, W
    then after H, W (TF "same" at stride 2: ``[0, 0, 1, 1]``): the loop reads the zero-point pad
    pixel for taps outside the image, so no padded copy of the input is made
    (`quanta.integer.padded_depthwise`); so may a gathered conv's (C % 4 != 0: its gather reads the
    zero point outside the image); dense convs refuse unequal ones."""
    if weight.dim() == 3:
        weight, stride, padding, dilation = weight.unsqueeze(2), [1, *stride], [0, *padding], [1, *dilation]
    in_ch = weight.shape[1] * groups
    kind = _kind(in_ch, weight, groups)
    assert kind is not None, "guard_native refuses this grouping"
    w_sum = weight.reshape(weight.shape[0], -1).sum(1, dtype=torch.int32)
    return native.module().ConvPlan(
        pack_weight(weight, kind), w_sum, float(x_scale), int(x_zero_point), w_scale.float().contiguous(),
        None if bias is None else bias.float().contiguous(), in_ch, weight.shape[0], list(weight.shape[2:]),
        [int(s) for s in stride], [int(p) for p in padding], [int(d) for d in dilation], kind == "depthwise",
        _POST[post_op], None if out_scale is None else float(out_scale), int(out_zero_point))


def plan_call(plan: object, x_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(x)``: the plan's convolution of a ``x_dim``-d uint8 ``x`` (any layout; the kernel
    reads channels-last; a 1d input as a 2d one of unit height)."""
    run_plan = plan.run  # type: ignore[attr-defined]
    if x_dim == 3:
        def run(x: torch.Tensor) -> torch.Tensor:
            return run_plan(x.unsqueeze(2).contiguous(memory_format=torch.channels_last)).squeeze(2)
        return run
    layout = torch.channels_last

    def run4(x: torch.Tensor) -> torch.Tensor:
        return run_plan(x.contiguous(memory_format=layout))
    return run4


def compiled_run(x: torch.Tensor, arguments: tuple) -> torch.Tensor:
    """The plan's convolution as the ``quanta_native::conv_packed`` op (``arguments``:
    ``ConvPlan.arguments()``), for compiled graphs: the call goes from the graph straight to C++,
    with the same function and numbers as ``ConvPlan.run`` (the op and its fake kernel come with
    the native library, `quanta.kernels.graph_ops`)."""
    op = torch.ops.quanta_native.conv_packed.default
    if x.dim() == 3:
        return op(x.unsqueeze(2).contiguous(memory_format=torch.channels_last), *arguments).squeeze(2)
    return op(x.contiguous(memory_format=torch.channels_last), *arguments)


def native_call(x_dim: int, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
                packed: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The native convolution with everything but the uint8 codes settled: ``run(x)`` for a
    ``x_dim``-d uint8 ``x`` (any layout; the kernel reads channels-last). Integer modules keep one
    per input signature (``packed``, oneDNN's weight, is not used)."""
    return plan_call(make_plan(weight, w_scale, bias, x_scale, x_zero_point, stride, padding, dilation, groups,
                               post_op, out_scale, out_zero_point), x_dim)


def run_native(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
               packed: torch.Tensor | None) -> torch.Tensor:
    """The op's ``native`` implementation, arguments already checked: plans per call (integer
    modules keep their plan, see `native_call`)."""
    if x.dtype == torch.int8:  # uint8 kernel codes: x + 128 exactly, as a bit flip
        x = torch.bitwise_xor(x.view(torch.uint8), 128)
        x_zero_point += 128
    return native_call(x.dim(), x_scale, x_zero_point, weight, w_scale, bias, stride, padding, dilation, groups,
                       post_op, out_scale, out_zero_point)(x)


__all__ = ["AVX2_DENSE_NATIVE_OUTPUTS", "AVX2_DENSE_NATIVE_REDUCTION",
           "DEPTHWISE_RUN_KERNELS", "ISA_KINDS", "PREFER_ONEDNN_DEPTHWISE_OUTPUTS", "PREFER_ONEDNN_OUTPUTS",
           "PREFER_ONEDNN_REDUCTION", "compiled_run", "conv_isa", "guard_native", "make_plan", "native_available",
           "is_pointwise", "native_call", "native_limits", "pack_weight", "plan_call", "prefer_onednn", "run_native"]
