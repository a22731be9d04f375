"""Float attention ``softmax(scale · q · kᵀ + mask) · v`` in one native pass (``csrc/attention.cpp``).

A user's attention written as ``matmul → scale → (+ mask) → softmax → matmul`` costs, on CPU,
two batched matmuls on ``[B, S, H, D] → [B, H, S, D]`` transposed views, a ``[B, H, S, S]``
score tensor written and read three times, and a softmax over it. The native kernel reads the
views in place, keeps the scores of a few query rows in a buffer and computes each output row
in one thread (the result does not depend on the thread count).

It is float work, so not bit-identical to the ops it replaces: within float32 rounding of
`reference` (another summation order; exp by a polynomial of relative error < 2e-7). NaN
behaves as in torch's softmax: a row with a NaN score, or whose maximum is not finite (every key
masked with ``-inf``), comes out NaN.

`attention` runs the kernel where it can take the inputs (float32 CPU tensors of 2 to 4
dimensions with equal leading dimensions, a float32 mask that broadcasts to the scores) and
`reference` elsewhere. With autograd on, the forward is the kernel's and the backward that of
`reference` at the same inputs (recomputed), so training and inference see the same forward.
"""

from __future__ import annotations

import torch

from . import native


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """The ops the kernel replaces, in torch."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def native_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``q, k, v, mask`` as the kernel's ``[B, H, L, D]`` views (the mask expanded to
    ``[B, H, Lq, Lk]``), or None where the kernel cannot take them."""
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    rank = q.dim()
    if not 2 <= rank <= 4 or k.dim() != rank or v.dim() != rank or q.shape[:-2] != k.shape[:-2] \
            or v.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1] or v.shape[-2] != k.shape[-2]:
        return None
    m4 = None
    if mask is not None:
        full = (*q.shape[:-1], k.shape[-2])
        if mask.dim() > rank or torch.broadcast_shapes(mask.shape, full) != torch.Size(full):
            return None
        m4 = _as_4d(mask.expand(full))
    return _as_4d(q), _as_4d(k), _as_4d(v), m4


def available() -> bool:
    return native.ensure() is not None


class _KernelForward(torch.autograd.Function):
    """The kernel's forward; the backward of `reference` at the same inputs."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, shape):  # type: ignore[override]
        ctx.save_for_backward(q, k, v, *(() if mask is None else (mask,)))
        ctx.scale = scale
        forms = native_inputs(q, k, v, mask)
        return torch.ops.quanta_native.attention(*forms, scale).view(shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = reference(*saved[:3], saved[3] if len(saved) > 3 else None, ctx.scale)
            wanted = [t for t in saved if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
        result = [next(grads) if t.requires_grad else None for t in saved]
        return (*result[:3], result[3] if len(result) > 3 else None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float = 1.0) -> torch.Tensor:
    """``softmax(scale · q · kᵀ + mask) · v``: the native kernel where it takes the inputs, else
    `reference`."""
    forms = native_inputs(q, k, v, mask) if available() else None
    if forms is None:
        return reference(q, k, v, mask, scale)
    shape = (*q.shape[:-1], v.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return _KernelForward.apply(q, k, v, mask, float(scale), shape)
    return torch.ops.quanta_native.attention(*forms, float(scale)).view(shape)


__all__ = ["attention", "available", "native_inputs", "reference"]
