"""`TensorQuantizer`: the module that calibrates, fake-quantizes or passes a tensor through."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..calib import CALIBRATORS, HistogramCalibrator, make_calibrator, statistics_of
from ..core import (
    Granularity,
    QuantSpec,
    choose_qparams,
    compute_range,
    fake_quantize,
    lsq_grad_factor,
    max_level,
    quantize,
)
from .descriptor import CALIB_METHODS, QuantDescriptor


class TensorQuantizer(nn.Module):
    """Quantizes one tensor per its `QuantDescriptor`.

    Modes (NVIDIA pytorch-quantization semantics): *calibrate* collects statistics and passes
    data through unchanged; *quantize* fake-quantizes (or returns integer codes when
    ``fake_quant=False``); *disabled* is the identity. Ranges are buffers (``amax``, and
    ``amin`` for asymmetric quantizers) so ``state_dict`` holds them; with ``learn_amax``
    ``amax`` is an ``nn.Parameter`` trained through the LSQ gradient.
    """

    def __init__(self, desc: QuantDescriptor | None = None, axis: int | None = None,
                 group_axis: int = -1, name: str | None = None, track_tensor: bool = False):
        super().__init__()
        desc = QuantDescriptor() if desc is None else desc
        if not isinstance(desc, QuantDescriptor):
            raise TypeError(f"desc must be a QuantDescriptor, got {type(desc).__name__}")
        self.desc = desc
        self.spec: QuantSpec = desc.to_spec(axis=axis, group_axis=group_axis)
        self.name = name or desc.name
        # Weight quantizers: without a fixed or calibrated range, the range is the descriptor's
        # method applied to the tensor itself, recomputed only when the tensor changes (its
        # version counter), so ranges follow load_state_dict and QAT updates.
        self.track_tensor = track_tensor
        self.register_buffer("amax", None)
        self.register_buffer("amin", None)
        self._calibrator: Any = None
        self._calib_kind: str | None = None
        self._calib_method: str | None = None
        self._if_calib = False
        self._if_quant = True
        self._disabled = False
        self._cache: tuple[Any, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._tensor_cache: dict[int, tuple[Any, Any, tuple[torch.Tensor, torch.Tensor]]] = {}
        if desc.amax is not None:
            self.set_range(torch.tensor(-desc.amax if self.spec.signed else 0.0), torch.tensor(float(desc.amax)))

    # ------------------------------------------------------------------ modes
    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self, method: str | None = None) -> None:
        """Collect statistics from now on; ``method`` overrides the descriptor's for this
        calibration (a fresh calibrator is made when it needs a different kind)."""
        method = method or self.desc.calib_method
        if self._calibrator is None or statistics_of(method) != self._calib_kind:
            self._calibrator = self._make_calibrator(method)
            self._calib_kind = statistics_of(method)
        self._calib_method = method
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    @property
    def is_enabled(self) -> bool:
        """Not `disable`d (it may still pass data through: see `quantizing`, `active`)."""
        return not self._disabled

    @property
    def quantizing(self) -> bool:
        """Enabled and quantizing: its forward changes the values (what an integer kernel replaces)."""
        return not self._disabled and self._if_quant

    @property
    def active(self) -> bool:
        """Enabled and quantizing or collecting statistics: its forward is not the identity."""
        return not self._disabled and (self._if_quant or self._if_calib)

    @property
    def mode(self) -> str:
        if self._disabled:
            return "disabled"
        if self._if_calib:
            return "calibrate+quantize" if self._if_quant else "calibrate"
        return "quantize" if self._if_quant else "disabled"

    @property
    def needs_calibration(self) -> bool:
        """Static, enabled, and without a range yet."""
        return (not self._disabled and self.spec.has_scale and not self.spec.dynamic and not self.track_tensor
                and self.amax is None)

    @property
    def calibrator(self) -> Any:
        return self._calibrator

    def _label(self) -> str:
        return f"TensorQuantizer {self.name!r}" if self.name else "TensorQuantizer"

    def _make_calibrator(self, method: str | None = None) -> Any:
        gran = self.spec.granularity
        if gran not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
            raise ValueError(f"{self._label()}: {gran.value} quantizers compute ranges per call or from "
                             "the tensor itself; they are not calibrated")
        method = method or self.desc.calib_method
        if method not in CALIBRATORS:
            raise ValueError(f"{self._label()}: unknown calibration method {method!r}; choose one of {CALIB_METHODS}")
        kwargs: dict[str, Any] = {}
        if statistics_of(method) == "histogram":
            if self.spec.granularity is not Granularity.PER_TENSOR:
                raise ValueError(f"{self._label()}: calibration method {method!r} is per-tensor only; "
                                 f"this quantizer is {self.spec.granularity.value}")
            kwargs["num_bins"] = self.desc.num_bins
        return make_calibrator(method, num_bits=self.spec.bits, axis=self.spec.axis,
                               unsigned=not self.spec.signed, name=self.name, **kwargs)

    # ------------------------------------------------------------------ ranges
    def set_range(self, amin: torch.Tensor | None, amax: torch.Tensor) -> None:
        """Set the clipping range; symmetric quantizers keep only ``amax = max(|amin|, |amax|)``."""
        amax = torch.as_tensor(amax, dtype=torch.float32).detach()
        if amin is not None:
            amin = torch.as_tensor(amin, dtype=torch.float32).detach()
        if self.spec.symmetric:
            hi = amax.abs() if amin is None else torch.maximum(amin.abs(), amax.abs())
            lo = None
        else:
            hi, lo = amax, (torch.zeros_like(amax) if amin is None else amin)
        dev = next((t.device for t in (self.amax,) if t is not None), hi.device)
        if self.desc.learn_amax:
            self.amax = nn.Parameter(hi.to(dev).clone())
        else:
            self.amax = hi.to(dev).clone()
        self.amin = None if lo is None else lo.to(dev).clone()
        self._cache = None

    def range_of(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range the descriptor's method gives for ``t`` alone (weights): exact min/max
        per granularity, or a calibrator run on this one tensor."""
        if self.desc.calib_method == "max" or self.spec.granularity is Granularity.PER_GROUP:
            return compute_range(t.detach(), self.spec)
        calib = self._make_calibrator()
        calib.collect(t.detach())
        return self._compute(calib)

    def init_from_tensor(self, t: torch.Tensor) -> None:
        """Fix the range to ``range_of(t)`` (learned weight ranges start here)."""
        if not self.spec.dynamic:
            self.set_range(*self.range_of(t))

    def _compute(self, calib: Any, method: str | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        method = method or self._calib_method or self.desc.calib_method
        if isinstance(calib, HistogramCalibrator):
            if method == "percentile":
                kwargs.setdefault("percentile", self.desc.percentile)
            return calib.compute_range(method=None if method == "histogram" else method, **kwargs)
        if statistics_of(method) == "histogram":
            raise ValueError(f"{self._label()}: method {method!r} needs a histogram; this quantizer "
                             f"collected with {type(calib).__name__} (calibrate with method={method!r})")
        return calib.compute_range(**kwargs)

    def load_calib_amax(self, method: str | None = None, **kwargs: Any) -> None:
        """Load the range the calibrator proposes (``method`` overrides the descriptor's,
        for histogram calibrators: ``percentile``, ``mse``, ``entropy`` or ``max``)."""
        if self._calibrator is None:
            raise ValueError(f"{self._label()} has no calibrator: run calibration first")
        self.set_range(*self._compute(self._calibrator, method, **kwargs))

    def reset_calibrator(self) -> None:
        self._calibrator = None
        self._calib_kind = self._calib_method = None

    # ------------------------------------------------------------------ forward
    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ``x`` (needed only for dynamic quantizers)."""
        if not self.spec.has_scale:  # fp16 / bf16: a plain cast, no range
            return choose_qparams(torch.zeros(()), torch.zeros(()), self.spec)
        if self.spec.dynamic:
            if x is None:
                raise ValueError(f"{self._label()} is dynamic: qparams need the tensor")
            lo, hi = compute_range(x.detach(), self.spec)
            return choose_qparams(lo, hi, self.spec)
        if self.amax is None and self.track_tensor and x is not None:
            key = (x._version, tuple(x.shape), x.device)
            hit = self._tensor_cache.get(id(x))
            if hit is None or hit[0]() is not x or hit[1] != key:  # weakref guards id reuse
                lo, hi = self.range_of(x)
                hit = self._tensor_cache[id(x)] = (weakref.ref(x), key, choose_qparams(lo, hi, self.spec))
            return hit[2]
        if self.amax is None:
            raise RuntimeError(f"{self._label()} has no range: calibrate the model (quanta.calibrate) "
                               "or give the descriptor a fixed amax")
        if isinstance(self.amax, nn.Parameter):
            scale = self.amax.abs().clamp_min(torch.finfo(torch.float32).tiny) / max_level(self.spec)
            return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        key = (id(self.amax), self.amax._version, None if self.amin is None else self.amin._version)
        if self._cache is None or self._cache[0] != key:
            lo = -self.amax if self.amin is None else self.amin
            self._cache = (key, choose_qparams(lo, self.amax, self.spec))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._if_calib:
            if self._calibrator is None:
                self.enable_calib()
            self._calibrator.collect(x.detach())
        if not self._if_quant:
            return x
        scale, zp = self.qparams(x)
        if not self.desc.fake_quant:
            return quantize(x, scale, zp, self.spec)
        grad_factor = 1.0
        if isinstance(self.amax, nn.Parameter):
            grad_factor = lsq_grad_factor(max(x.numel() // max(scale.numel(), 1), 1), self.spec)
        return fake_quantize(x, scale, zp, self.spec, grad_factor=grad_factor)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for key in ("amax", "amin"):
            full = prefix + key
            if full in state_dict and getattr(self, key) is None:
                value = state_dict[full]
                if key == "amax" and self.desc.learn_amax:
                    self.amax = nn.Parameter(value.detach().clone().float())
                else:
                    setattr(self, key, value.detach().clone().float())
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        parts = [str(self.spec)]
        if self.amax is not None:
            a = self.amax.detach()
            rng = f"amax={a.item():.4g}" if a.numel() == 1 else (
                f"amax=[{a.min().item():.4g}, {a.max().item():.4g}]({a.numel()})")
            if self.amin is not None:
                m = self.amin.detach()
                rng = (f"range=[{m.min().item():.4g}, {a.max().item():.4g}]" if m.numel() > 1
                       else f"range=[{m.item():.4g}, {a.item():.4g}]")
            parts.append(rng)
        elif self.spec.dynamic:
            parts.append("dynamic range")
        elif self.track_tensor:
            parts.append("range from tensor")
        else:
            parts.append("uncalibrated")
        if self.desc.learn_amax:
            parts.append("learned")
        if self._calibrator is not None:
            parts.append(type(self._calibrator).__name__)
        parts.append(self.mode)
        return " ".join(parts)
