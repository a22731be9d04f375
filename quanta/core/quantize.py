"""quantize / dequantize / fake_quantize, with their gradients (STE and LSQ), written once.

All three go through the format codecs in :mod:`quanta.core.formats`:
``v = x * (1 / scale)`` (the reciprocal is taken in float32, exactly as PyTorch's quantized
kernels do, so results are bit-identical to ``torch.fake_quantize_per_*_affine``), then
``encode`` / ``decode``. Inputs are never modified in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .formats import decode, encode, storage_dtype
from .granularity import Layout, check_float
from .qparams import choose_qparams, compute_range
from .spec import Format, QuantSpec


class QTensor(NamedTuple):
    """A quantized tensor in canonical form: codes plus the parameters that decode them."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.spec, dtype)


def _params(x: torch.Tensor, scale: Any, zero_point: Any, spec: QuantSpec):
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if zero_point is None:
        zero_point = 0
    zp_t = torch.as_tensor(zero_point, device=x.device)
    if zp_t.shape != scale_t.shape and zp_t.numel() != 1:
        raise ValueError(f"zero_point shape {tuple(zp_t.shape)} != scale shape {tuple(scale_t.shape)}")
    if zp_t.is_floating_point() and bool((zp_t != torch.round(zp_t)).any()):
        raise ValueError("zero_point must hold integers")
    if spec.format is not Format.INT and bool((zp_t != 0).any()):
        raise ValueError(f"format {spec.format.value!r} has no zero point; pass 0")
    if bool((scale_t <= 0).any()) or not bool(torch.isfinite(scale_t).all()):
        raise ValueError("scale must be positive and finite")
    return scale_t, zp_t.float().expand_as(scale_t) if zp_t.numel() == 1 else zp_t.float()


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes of ``x``: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` in ``storage_dtype``."""
    check_float(x)
    scale_t, zp_t = _params(x, scale, zero_point, spec)
    lay = Layout(tuple(x.shape), tuple(scale_t.shape), spec)
    s, z = lay.to_param(scale_t), lay.to_param(zp_t)
    code, _ = encode(lay.to_work(x.float()) * (1.0 / s), z, spec, generator)
    return lay.restore(code).to(storage_dtype(spec))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` (in the format's sense), as ``dtype``."""
    scale_t, zp_t = _params(q, scale, zero_point, spec)
    lay = Layout(tuple(q.shape), tuple(scale_t.shape), spec)
    level = decode(lay.to_work(q), lay.to_param(zp_t), spec)
    return lay.restore(level * lay.to_param(scale_t)).to(dtype)


class _FakeQuantize(torch.autograd.Function):
    """x_hat = decode(encode(x / s)) * s.

    Gradients (one definition shared by QAT and learnable ranges):
    - x: straight-through estimator with clipping, ``grad * inside``;
    - scale (LSQ, Esser et al. 2019): ``level - v`` inside the range, ``level`` (the clamped
      level, e.g. ``qmax - zp``) outside, times ``grad_factor``, summed per scale;
    - zero point: 0 inside, ``-scale`` outside, times ``grad_factor``.
    """

    @staticmethod
    def forward(ctx, x, scale, zp, spec, generator, grad_factor):  # type: ignore[override]
        lay = Layout(tuple(x.shape), tuple(scale.shape), spec)
        # A learned zero point is a float: the forward uses it rounded (half to even, as
        # torch's learnable fake-quant does), its gradient is the straight-through one.
        s, z = lay.to_param(scale.float()), lay.to_param(torch.round(zp.detach().float()))
        v = lay.to_work(x.float()) * (1.0 / s)
        code, inside = encode(v, z, spec, generator)
        level = decode(code, z, spec)
        need_s, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.lay, ctx.grad_factor = lay, grad_factor
        ctx.shapes = (tuple(scale.shape), tuple(zp.shape))
        slope = torch.where(inside, level - v, level) if need_s else None
        ctx.save_for_backward(inside, slope, s if need_z else None)
        return lay.restore(level * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside, slope, s = ctx.saved_tensors
        lay: Layout = ctx.lay
        gw = lay.to_work(grad.float())
        grad_x = lay.restore(gw * inside).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if slope is not None:
            grad_s = _sum_to(gw * slope, lay, ctx.shapes[0]) * ctx.grad_factor
        if s is not None:
            outside = torch.where(inside, torch.zeros_like(gw), -gw * s)
            grad_z = _sum_to(outside, lay, ctx.shapes[1]) * ctx.grad_factor
        return grad_x, grad_s, grad_z, None, None, None


def _sum_to(t: torch.Tensor, lay: Layout, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum a working-view tensor down to the parameter's broadcast view, then to ``shape``."""
    target = lay.to_param(torch.zeros(shape, dtype=t.dtype, device=t.device)).shape
    pad = t.dim() - len(target)
    target = (1,) * pad + tuple(target)
    dims = [i for i, (a, b) in enumerate(zip(t.shape, target)) if b == 1 and a != 1]
    out = t.sum(dim=dims, keepdim=True) if dims else t
    if lay._ga is not None:  # per_group: [..., n_groups, 1] with the group axis moved last
        out = out.squeeze(-1).movedim(-1, lay._ga)
    return out.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int | None,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Quantize then dequantize, differentiable (see `_FakeQuantize` for the gradients).

    To learn the scale (LSQ), pass a ``scale`` tensor with ``requires_grad=True``; the
    recommended ``grad_factor`` is :func:`lsq_grad_factor`.
    """
    check_float(x)
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        if scale.dtype != torch.float32:
            raise TypeError(f"a learnable scale must be float32, got {scale.dtype}")
        # (no data-dependent check in a compiled graph: it would break it at every call)
        if not torch.compiler.is_compiling() and bool((scale.detach() <= 0).any()):
            raise ValueError("scale must be positive")
        scale_t = scale
        zp_t = torch.as_tensor(0 if zero_point is None else zero_point, device=x.device)
        zp_t = zp_t if zp_t.is_floating_point() else zp_t.float()
        if zp_t.numel() == 1 and scale_t.numel() != 1:
            zp_t = zp_t.expand(scale_t.shape)
        elif zp_t.shape != scale_t.shape:
            raise ValueError(f"zero_point shape {tuple(zp_t.shape)} != scale shape {tuple(scale_t.shape)}")
    else:
        scale_t, zp_t = _params(x, scale, zero_point, spec)
        if isinstance(zero_point, torch.Tensor) and zero_point.requires_grad:
            zp_t = zero_point
    return _FakeQuantize.apply(x, scale_t, zp_t, spec, generator, grad_factor)


def lsq_grad_factor(numel_per_scale: int, spec: QuantSpec) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Qp)`` for a scale shared by ``N`` values."""
    qp = max(abs(spec.qmax), 1) if spec.is_integer else 1
    return 1.0 / float(numel_per_scale * qp) ** 0.5


def quantize_tensor(
    x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> QTensor:
    """Range → qparams → codes in one call (what dynamic quantization does per call)."""
    lo, hi = compute_range(x, spec)
    scale, zp = choose_qparams(lo, hi, spec)
    return QTensor(quantize(x, scale, zp, spec, generator), scale, zp, spec)
