"""GPTQ's numerics on one weight matrix (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"), with no `nn.Module` in sight.

In Linear orientation, ``W`` is ``[out, in]`` and ``H = Σ x xᵀ`` (``[in, in]``, summed over the
layer's input rows). Columns are quantized one at a time; each column's rounding error, scaled by
the inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized (lazily, one
block of ``blocksize`` columns at a time), so that the layer's output on the calibration inputs
moves as little as possible. Shapes, for ``W [out, in]``:

- per-column parameters ``scale`` / ``zero_point``: ``[out, in]`` (a group's value repeated over
  its columns; per channel: one value repeated over the row);
- ``act_order``: columns visited in order of decreasing ``diag(H)``; the grid of each column
  stays the one of its own group in the original layout (what the group-wise kernels hold);
- dynamic groups (``group_qparams`` given, no act-order): each group's scale / zero point is
  chosen from its columns as they stand when the first of them is reached (earlier errors
  already pushed onto them), the reference implementation's default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class SolverError(ValueError):
    """The layer cannot be solved (a Hessian no damping makes positive definite, non-finite values)."""


class Solution(NamedTuple):
    codes: torch.Tensor  # [out, in] integer codes (float32), original column order
    scale: torch.Tensor  # [out, in] per-column scale used
    zero_point: torch.Tensor  # [out, in] per-column zero point used
    damp: float  # the dampening added to diag(H)
    dead: int  # input columns whose inputs are all zero (kept at round-to-nearest)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(w · (1/scale)) + zp, qmin, qmax)`` elementwise (quanta's rounding: the
    reciprocal in float32, round half to even)."""
    return (torch.round(w * (1.0 / scale)) + zp).clamp(qmin, qmax)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int) -> float:
    """Mean over the ``rows`` captured inputs ``x`` of ``‖(w_hat − w) x‖²``, from ``H = Σ x xᵀ``."""
    delta = (w_hat.double() - w.double())
    return float(((delta @ hessian.double()) * delta).sum()) / max(rows, 1)


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` in float64, ``λ = percdamp · mean(diag H)``, retried
    with λ ×10 up to ``retries`` times while the factorisation fails or is not finite."""
    h = hessian.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp * float(torch.diagonal(h).mean())
    for _ in range(retries + 1):
        low, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()) and bool((torch.diagonal(upper) > 0).all()):
                return upper, damp
        damp *= 10.0
    raise SolverError(f"its Hessian is not positive definite even with dampening {damp / 10:.3g} "
                      f"({retries} retries)")


def solve(w: torch.Tensor, hessian: torch.Tensor, *, qmin: int, qmax: int, scale: torch.Tensor | None,
          zero_point: torch.Tensor | None, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
          retries: int = 4, group_size: int | None = None,
          group_qparams: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> Solution:
    """GPTQ codes for ``w`` (``[out, in]``) given ``hessian`` (``Σ x xᵀ``, ``[in, in]``).

    Either a fixed grid (``scale`` / ``zero_point``, ``[out, in]``), or dynamic groups:
    ``group_size`` and ``group_qparams(columns [out, g]) -> (scale [out], zero_point [out])``
    (not with ``act_order``). Inputs whose ``diag(H)`` is 0 are dead: their columns are rounded to
    nearest and pass no error on."""
    in_features = w.shape[1]
    dynamic = group_qparams is not None
    if dynamic and (act_order or not group_size or in_features % group_size):
        raise ValueError("solve: dynamic groups need a group_size dividing the inputs and no act_order")
    if not dynamic and (scale is None or zero_point is None):
        raise ValueError("solve: give scale and zero_point, or group_size and group_qparams")
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    work = w.detach().float().clone()
    s = torch.empty_like(work) if dynamic else scale.float().expand_as(work).clone()
    z = torch.empty_like(work) if dynamic else zero_point.float().expand_as(work).clone()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        work, h, s, z = work[:, perm], h[perm][:, perm], s[:, perm], z[:, perm]
    upper, damp = inverse_cholesky(h, percdamp, retries)
    hinv = upper.float()
    codes = torch.zeros_like(work)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        block = work[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % group_size == 0:
                cols = torch.cat([block[:, i:], work[:, i2:]], dim=1)[:, :group_size]
                gs, gz = group_qparams(cols)
                s[:, col:col + group_size] = gs.float().unsqueeze(1)
                z[:, col:col + group_size] = gz.float().unsqueeze(1)
            q = quantize_columns(block[:, i], s[:, col], z[:, col], qmin, qmax)
            codes[:, col] = q
            e = (block[:, i] - (q - z[:, col]) * s[:, col]) / hinv_block[i, i]
            block[:, i:] -= e.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err[:, i] = e
        work[:, i1:i2] = block
        work[:, i2:] -= err @ hinv[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        codes, s, z = codes[:, inv], s[:, inv], z[:, inv]
    if not (torch.isfinite(codes).all() and torch.isfinite(s).all()):
        raise SolverError("its GPTQ update is not finite")
    return Solution(codes, s, z, damp, int(dead.sum()))
