"""Pieces every integer Linear module shares: lowering checks, output quantization, the base class.

The module classes live in `linear` (int8 x int8) and `weight_only` (int8 / int4 weights,
half-precision weights)."""

from __future__ import annotations

from typing import Any

import torch

from ..core import Format, Granularity, QuantSpec, choose_qparams, compute_range, fake_quantize, quantize
from ..nn.modules.weighted import QuantLinear
from .base import IntegerModule
from .validate import flag, positive_int

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: the plain-cast formats (no scale, round to nearest even: `QuantSpec` allows no other) and their dtypes
_CASTS = {Format.BF16: torch.bfloat16, Format.FP16: torch.float16}


# ----------------------------------------------------------------------------- shared pieces
def _active(q: Any) -> bool:
    return q is not None and q.is_enabled


def _common_reason(sim: Any) -> str | None:
    if not isinstance(sim, QuantLinear):
        return f"expects a QuantLinear, got {type(sim).__name__}"
    for kind, q in sim.quantizers():
        if q.is_enabled and q.mode != "quantize":
            return f"{kind} quantizer is in mode {q.mode!r} (finish calibration first)"
        if q.needs_calibration:
            return f"{kind} quantizer has no range: calibrate the model first"
    if not _active(sim.weight_quantizer):
        return "weight quantizer disabled (keep the layer in float)"
    oq = sim.output_quantizer
    if _active(oq) and oq.spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
        return f"output quantizer granularity {oq.spec.granularity.value!r} (per_tensor / per_token only)"
    return None


def _check_activation(activation: str) -> str:
    if activation not in ("float32", "bfloat16"):
        raise ValueError(f"activation must be 'float32' or 'bfloat16', got {activation!r}")
    return activation


def _weight_only_activation(sim: Any) -> tuple[str | None, str | None]:
    """``(activation dtype name, None)`` for a weight-only lowering, or ``(None, reason)``.

    Weight-only layers take float activations; a simulated input quantizer that is a plain
    bfloat16 cast means the kernel runs on bfloat16 activations (torch's CPU weight-only kernels
    are fast only there), which is then exactly what the simulation specifies."""
    q = sim.input_quantizer
    if not _active(q):
        return "float32", None
    if q.spec.format is Format.BF16:
        return "bfloat16", None
    return None, f"input quantizer {q.spec} (weight-only layers take float32 or bfloat16 activations)"


def _weight_only_reason(sim: Any, hint: str = "") -> str | None:
    """`_common_reason`, then whether the activations suit a weight-only layer (``hint`` is
    appended to that refusal)."""
    reason = _common_reason(sim)
    if reason:
        return reason
    act, why = _weight_only_activation(sim)
    return None if act is not None else f"{why}{hint}"


def _int_weight_reason(spec: QuantSpec, max_bits: int = 8) -> str | None:
    if spec.format is not Format.INT or not spec.signed or not spec.symmetric:
        return f"weights must be signed symmetric integers, got {spec}"
    if spec.bits > max_bits:
        return f"weights of {spec.bits} bits (at most {max_bits})"
    if spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL) or \
            (spec.granularity is Granularity.PER_CHANNEL and spec.axis not in (0, -2)):
        return f"weight granularity {spec} (per output channel or per tensor only)"
    return None


def _per_channel_weight(sim: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K] and scales [N] of the simulated weight (quanta.core numerics)."""
    wq = sim.weight_quantizer
    w = sim.weight.detach()
    scale, zp = wq.qparams(w)
    codes = quantize(w, scale, zp, wq.spec).to(torch.int8)
    return codes, scale.float().reshape(-1).expand(w.shape[0]).clone()


class _OutputQuant:
    """The simulated output quantizer, applied to the float output (static or dynamic)."""

    def _init_output(self, spec: QuantSpec | None, out_features: int) -> None:
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__}: output_spec must be a QuantSpec or None, got {type(spec).__name__}")
        if spec is not None and spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            raise ValueError(f"{type(self).__name__}: output_spec must be per tensor or per token, got {spec}")
        self.output_spec = spec
        if spec is not None and not spec.dynamic:
            self.register_buffer("output_scale", torch.ones(()))
            self.register_buffer("output_zero_point", torch.zeros((), dtype=torch.int32))

    def _copy_output(self, sim: Any) -> None:
        if self.output_spec is not None and not self.output_spec.dynamic:
            s, z = sim.output_quantizer.qparams()
            self.output_scale.copy_(s.reshape(()))
            self.output_zero_point.copy_(z.reshape(()))

    def _apply_output(self, y: torch.Tensor) -> torch.Tensor:
        spec = self.output_spec
        if spec is None:
            return y
        if spec.dynamic:
            s, z = choose_qparams(*compute_range(y, spec), spec)
        else:
            s, z = self.output_scale, self.output_zero_point
        return fake_quantize(y, s, z, spec)

    def _output_repr(self) -> str:
        return "" if self.output_spec is None else f", output={self.output_spec}"


def _output_spec_of(sim: Any) -> QuantSpec | None:
    return sim.output_quantizer.spec if _active(sim.output_quantizer) else None


def _bias_of(sim: Any) -> torch.Tensor | None:
    return None if sim.bias is None else sim.bias.detach().float()


class _LinearBase(_OutputQuant, IntegerModule):
    simulated_type = QuantLinear
    in_features: int
    out_features: int

    def _init_linear(self, in_features: int, out_features: int, bias: bool) -> None:
        owner = type(self).__name__
        self.in_features = positive_int(owner, "in_features", in_features)
        self.out_features = positive_int(owner, "out_features", out_features)
        if flag(owner, "bias", bias):
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def _check(self, x: Any, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> torch.Tensor:
        self.check_input(x, dtypes)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(-1, self.in_features)

    @staticmethod
    def _run_key(*args: Any) -> tuple[Any, ...]:
        """What the linear guards read that can change per call: dtype, device, the row count
        thresholds (1, 8, 16, 32), which optional tensors (bias, packed weights...) are given."""
        x = args[0]
        rows = x.shape[0]
        return (x.dtype, x.device, rows if rows <= 32 else 33, tuple(a is None for a in args))

    def _run(self, op: Any, *args: Any) -> torch.Tensor:
        """``op(*args)`` through the module's binding (guards choose once per `_run_key`)."""
        return self.binding.run(op, self._run_key(*args), *args, preferred=self.impl)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device) keeps the runtime form in step
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # an output quantizer that is a plain cast to the dtype the kernel returned (weight-only
        # layers: bfloat16 out of a bfloat16 kernel) has nothing left to do: its values are on that grid
        on_grid = self.output_spec is not None and _CASTS.get(self.output_spec.format) is y.dtype
        if y.dtype != torch.float32:
            y = y.float()
        if not on_grid:
            y = self._apply_output(y)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _linear_config(self, **extra: Any) -> dict[str, Any]:
        spec = self.output_spec
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "output_spec": None if spec is None else spec.to_dict(), **extra}

    def set_impl(self, impl: str) -> None:
        """Prefer a kernel ("auto", "reference" or an implementation name) and repack for it."""
        self.impl = impl
        self.pack()
