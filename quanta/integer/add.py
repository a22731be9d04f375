"""``Int8Add``: the integer form of a calibrated `quanta.nn.QuantAdd` (a residual addition).

A residual addition between integer convolutions is where a CNN would otherwise leave uint8:
the simulation computes ``fq_a(a) + fq_b(b)`` (each operand on its own calibrated per-tensor
grid), and the next layers quantize the sum again. ``Int8Add`` takes each operand as uint8
codes on its grid (what a producing integer conv emits after `quanta.transforms.fuse`) or as
a float tensor (quantized here with that grid), and returns either the float sum or, once
`fuse_activations` has set ``output="uint8"``, the sum's codes on its consumers' grid with a
following ReLU / ReLU6 fused. Per element, in float32, the simulation's own operations::

    y = (float(a) - za) · sa + (float(b) - zb) · sb      (fake-quantized operands, summed)
    y = relu(y) / clamp(y, 0, 6)                          (post_op)
    codes = clamp(round_half_even(y · (1 / s_out)) + z_out, 0, 255)    (uint8 output)

so the float output equals the simulation exactly, and the uint8 output equals what the
consumer's own quantizer would make of it. The arithmetic is the op
`quanta.kernels.codes.add_codes` (float operands: `quantize_codes`): one native pass when both
operands are codes of the same shape and memory order (in compiled graphs too, as the
``quanta_native::add_codes`` operator), its reference's tensor operations otherwise;
``kernel_counts`` says which ran.

Canonical state: ``input_scale`` / ``input_zero_point`` and ``other_scale`` /
``other_zero_point`` (the operand grids, the specs' own codes), ``emit_scale`` /
``emit_zero_point`` (the uint8 output grid of ``set_output("uint8", ...)``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import Format, Granularity, QuantSpec, Rounding
from ..kernels.codes import add_codes, add_codes_call, dense, quantize_codes, quantize_codes_call
from ..nn.modules.functional import QuantAdd
from .base import IntegerModule
from .conv_specs import check_output_mode, emit_grid


def _operand_problem(spec: QuantSpec) -> str | None:
    if spec.format is not Format.INT or spec.bits != 8:
        return f"operand spec {spec} is not an 8-bit integer grid"
    if spec.granularity is not Granularity.PER_TENSOR or spec.dynamic:
        return f"operand spec {spec} is not a static per-tensor grid"
    if spec.rounding is not Rounding.HALF_EVEN:
        return f"operand spec {spec} rounds {spec.rounding.value} (the integer add rounds half to even)"
    return None


#: the default grid of each operand: affine uint8 per tensor (a frozen spec, shared safely)
_UINT8_AFFINE = QuantSpec(bits=8, signed=False, symmetric=False)


class Int8Add(IntegerModule):
    """``a + b`` on two per-tensor 8-bit grids; float or uint8 output (see the module doc)."""

    simulated_type = QuantAdd
    operand_names = ("input", "other")
    _SETTLED_LIMIT = 8  # settled operand signatures (memory stays bounded)

    def __init__(self, *, input_spec: QuantSpec = _UINT8_AFFINE, other_spec: QuantSpec = _UINT8_AFFINE,
                 output: str = "float", post_op: str = "none") -> None:
        super().__init__()
        for arg, spec in (("input_spec", input_spec), ("other_spec", other_spec)):
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"Int8Add: {arg} must be a QuantSpec, got {type(spec).__name__}")
            problem = _operand_problem(spec)
            if problem:
                raise ValueError(f"Int8Add: {arg}: {problem}")
        self.input_spec, self.other_spec = input_spec, other_spec
        for name in ("input", "other", "emit"):
            self.register_buffer(f"{name}_scale", torch.tensor(1.0))
            self.register_buffer(f"{name}_zero_point", torch.tensor(0, dtype=torch.int32))
        self._set_output_mode(output, post_op)  # (the grids' numbers are built once, when first needed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        if not isinstance(sim, QuantAdd):
            return f"expects a QuantAdd, got {type(sim).__name__}"
        for name in cls.operand_names:
            q = getattr(sim, f"{name}_quantizer", None)
            if q is None or not q.is_enabled:
                return f"its {name} quantizer is off (the sum stays float)"
            if q.mode != "quantize":
                return f"its {name} quantizer is in mode {q.mode!r} (finish calibration first)"
            if q.needs_calibration:
                return f"its {name} quantizer has no range: calibrate first"
            problem = _operand_problem(q.spec)
            if problem:
                return problem
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> Int8Add:
        cls.check_lowerable(sim)
        mod = cls(input_spec=sim.input_quantizer.spec, other_spec=sim.other_quantizer.spec)
        for name in cls.operand_names:
            s, z = getattr(sim, f"{name}_quantizer").qparams()
            getattr(mod, f"{name}_scale").copy_(s.reshape(()))
            getattr(mod, f"{name}_zero_point").copy_(z.reshape(()))
        return mod

    def config(self) -> dict[str, Any]:
        return {"input_spec": self.input_spec.to_dict(), "other_spec": self.other_spec.to_dict(),
                "output": self.output_kind, "post_op": self.post_op}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device): the grids follow
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def build_packed(self) -> None:
        self._grids = [self._grid(0), self._grid(1)]
        self._emit = self._emit_grid()

    def _grid(self, index: int) -> tuple[float, float, int, int, int]:
        """Operand ``index``'s grid as Python numbers ``(scale, 1/scale in float32, zero point, qmin,
        qmax)``, in kernel codes: uint8 (signed codes + 128)."""
        name, spec = self.operand_names[index], (self.input_spec, self.other_spec)[index]
        offset = 128 if spec.signed else 0
        scale = getattr(self, f"{name}_scale")
        return (float(scale), float(1.0 / scale.float()), int(getattr(self, f"{name}_zero_point")) + offset,
                spec.qmin + offset, spec.qmax + offset)

    def _emit_grid(self) -> tuple[float, float, int]:
        return float(self.emit_scale), float(1.0 / self.emit_scale.float()), int(self.emit_zero_point)

    # ------------------------------------------------------------------ the uint8 hand-off
    def operand_code_qparams(self, index: int) -> tuple[float, int]:
        """``(scale, zero_point)`` of the uint8 codes operand ``index`` (0: ``a``, 1: ``b``) takes."""
        if self._stale:
            self.ensure_packed()
        scale, _, zp, _, _ = self._grids[index]
        return scale, zp

    def set_output(self, kind: str = "float", scale: float | torch.Tensor | None = None,
                   zero_point: int | torch.Tensor | None = None, post_op: str = "none") -> Int8Add:
        """``"float"``: the sum (after ``post_op``); ``"uint8"``: its codes on the grid
        ``(scale, zero_point)`` (the consumers' input grid), ``post_op`` fused."""
        grid = emit_grid(self, kind, scale, zero_point)
        if grid is not None:
            self.emit_scale.fill_(grid[0])
            self.emit_zero_point.fill_(grid[1])
        self._set_output_mode(kind, post_op)
        if not self._stale:  # (a module never built gets it when built)
            self._emit = self._emit_grid()
        return self

    def _set_output_mode(self, kind: str, post_op: str) -> None:
        check_output_mode(self, kind, post_op)
        self.output_kind, self.post_op = kind, post_op
        self.forget_settled()

    # ------------------------------------------------------------------ forward
    def _codes(self, t: Any, index: int) -> tuple[torch.Tensor, Any]:
        """Operand ``index`` as uint8 codes, and the settled quantization that made them (None for codes)."""
        name = self.operand_names[index]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Int8Add expects tensors, got {type(t).__name__} for {name!r}")
        if t.dtype == torch.uint8:
            return t, None
        if not t.is_floating_point():
            raise TypeError(f"Int8Add expects float tensors or uint8 codes, got {t.dtype} for {name!r}")
        _, inv, zp, lo, hi = self._grids[index]
        args = (t, inv, zp, lo, hi, False, False)
        impl, checked = self.binding.choose(quantize_codes, (t.dtype, t.device, dense(t)), *args,
                                            preferred="reference" if self.impl == "reference" else "auto")
        codes = quantize_codes(*args, impl=impl, checked=checked)
        return codes, None if torch.compiler.is_compiling() else quantize_codes_call(impl, *args)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # the common eager call, once a first call settled its kernels: one dict lookup, the kernels
        calls = self.binding.calls
        if calls and not torch.compiler.is_compiling() and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            settled = calls.get(self._signature(a, b))
            if settled is not None:
                self.kernel_counts[settled[0]] += 1
                return settled[1](a, b)
        if self._stale:
            self.ensure_packed()
        (ca, qa), (cb, qb) = self._codes(a, 0), self._codes(b, 1)
        if ca.device != self.input_scale.device or cb.device != self.input_scale.device:
            raise ValueError(f"Int8Add holds its grids on {self.input_scale.device} but got inputs on "
                             f"{ca.device} / {cb.device}")
        (sa, _, za, _, _), (sb, _, zb, _, _) = self._grids
        _, inv, zo = self._emit
        args = (ca, sa, za, cb, sb, zb, self.post_op, inv if self.output_kind == "uint8" else None, zo, 0, 255)
        # (what the guards read that can change between calls: device, shapes, memory orders)
        impl, checked = self.binding.choose(add_codes, (ca.device, ca.shape, ca.stride(), cb.shape, cb.stride()),
                                            *args, preferred=self.impl)
        y = add_codes(*args, impl=self.binding.record(impl), checked=checked)
        if not torch.compiler.is_compiling():  # settle: later calls of these operands' signature
            self.binding.settle(self._signature(a, b), impl,
                                _settled_add(add_codes_call(impl, *args[1:3], *args[4:]), qa, qb))
        return y

    def _signature(self, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, ...]:
        """What the choices read: the operands' dtypes, devices, shapes, memory orders; the preferred impl."""
        return a.dtype, b.dtype, a.device, b.device, a.shape, a.stride(), b.shape, b.stride(), self.impl

    def extra_repr(self) -> str:  # (from the canonical buffers: a repr builds nothing)
        (sa, _, za, _, _), (sb, _, zb, _, _) = self._grid(0), self._grid(1)
        parts = [f"input={self.input_spec} scale={sa:.4g} zp={za}", f"other={self.other_spec} scale={sb:.4g} zp={zb}"]
        if self.output_kind == "uint8":
            parts.append(f"output=uint8 scale={float(self.emit_scale):.4g} zp={int(self.emit_zero_point)}")
        if self.post_op != "none":
            parts.append(f"post_op={self.post_op}")
        return ", ".join(parts)


def _settled_add(add: Any, quantize_a: Any, quantize_b: Any) -> Any:
    """The settled call of `Int8Add` on its operands: each float operand's quantization, the add."""
    if quantize_a is None and quantize_b is None:
        return add
    return lambda a, b: add(a if quantize_a is None else quantize_a(a), b if quantize_b is None else quantize_b(b))


__all__ = ["Int8Add"]
