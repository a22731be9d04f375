"""Whether torch's u8 × s8 int8 kernels (fbgemm, oneDNN) sum exactly on this CPU.

x86 CPUs without VNNI (AVX2-only, AVX-512 without ``avx512_vnni``) multiply uint8 × int8 with
``vpmaddubsw``, which adds each PAIR of products into an int16 that SATURATES: two products
``255 · 127`` sum to 64770 > 32767. fbgemm's and oneDNN's int8 GEMM / convolution then return
wrong sums, silently (that is why ``torch.ao`` uses ``reduce_range`` -- 7-bit activations -- on
x86). With VNNI (``avx512_vnni``, ``avx_vnni``) or AMX the products are summed in int32.

A feature list cannot say which instructions a library's kernel really runs, so each such
implementation is *probed* once per process: its kernel computes the integer sums of adversarial
codes (activations 255, weights ±127, K = 64: every pair overflows int16) with unit scales, and it
is exact only if every sum comes back exact. Where it is not, the implementation refuses
full-range uint8 activations (``Impl.limits`` gives the reason; `quanta doctor` prints it).

**7-bit weights are exact everywhere.** A pair sum is ``a0·b0 + a1·b1`` with ``a`` in [0, 255] and
``b`` the weight codes: with every ``|b| <= 64`` it is at most ``2 · 255 · 64 = 32640 <= 32767``, so
nothing saturates. The probe is therefore run per weight bound (`probe_bound`: ±64, the 7-bit codes
of a narrow [-63, 63] or full [-64, 63] 7-bit grid, and ±127, full range), once per library per
bound, and guards ask `SaturationProbe.refusal` with the weight itself: on a saturating CPU a kernel
still runs weights whose largest ``|code|`` (`weight_code_max`, remembered on the tensor) is
within an exact bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import build_config

#: the CPU features that sum u8 × s8 products in int32 (no int16 pair saturation)
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
SATURATES = "u8×s8 pair sums saturate without VNNI"
#: the reduction length of the probe (a multiple of every kernel's pair / quad blocking); each
#: bound is probed at this K and at `PROBE_K_ODD` (tails of 1 and 3 codes past a pair / quad block)
PROBE_K = 64
PROBE_K_ODD = 67
#: the largest |weight code| whose u8 × s8 pair sums fit int16: 2 · 255 · 64 = 32640 <= 32767
SEVEN_BIT_MAX = 64
#: the full-range probe's |weight code| (a kernel exact there sums in int32, so -128 is exact too)
FULL_RANGE_MAX = 127


def probe_bound(weight_max: int) -> int:
    """The probed bound that covers weights of largest ``|code|`` ``weight_max``: `SEVEN_BIT_MAX`
    or `FULL_RANGE_MAX`."""
    return SEVEN_BIT_MAX if weight_max <= SEVEN_BIT_MAX else FULL_RANGE_MAX


def adversarial_operands(rows: int = 3, k: int = PROBE_K,
                         weight_max: int = FULL_RANGE_MAX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, w, exact)``: uint8 activations ``[rows, k]`` all 255 (the last row 0 .. 255 ramping),
    int8 weights ``[4, k]`` (all +b, all -b, alternating ±b, all +1 for ``b = weight_max``) and the
    exact sums ``x @ w.T`` as float64 ``[rows, 4]``. On a saturating kernel rows of 255 against ±127
    give ``k / 2 · ±32767`` instead of ``k · ±32385``; against ±64 every pair sum (±32640) fits."""
    if not 1 <= weight_max <= FULL_RANGE_MAX:
        raise ValueError(f"adversarial_operands: weight_max must be in 1..{FULL_RANGE_MAX}, got {weight_max}")
    x = torch.full((rows, k), 255, dtype=torch.uint8)
    x[-1] = torch.arange(k, dtype=torch.int64).mul(4).clamp(max=255).to(torch.uint8)
    w = torch.full((4, k), weight_max, dtype=torch.int8)
    w[1] = -weight_max
    w[2, 1::2] = -weight_max
    w[3] = 1
    return x, w, x.double() @ w.double().t()


def cpu_vnni_features() -> list[str]:
    """The `VNNI_FEATURES` this CPU reports (empty off x86 or where /proc/cpuinfo is unreadable)."""
    have = set(build_config.cpu_features())
    return [f for f in VNNI_FEATURES if f in have]


def weight_code_max(weight: torch.Tensor) -> int:
    """The largest ``|code|`` of int8 weight codes (0 for an empty tensor), remembered on the tensor
    (``_quanta_code_max``, with its version: an in-place change, e.g. ``load_state_dict``, recomputes
    it). Integer modules call it when they pack, so guards find it there. -1 while torch.compile
    traces a tensor that was never measured eagerly (its codes cannot be read then)."""
    cached = getattr(weight, "_quanta_code_max", None)
    if torch.compiler.is_compiling():
        return cached[1] if cached is not None else -1
    if weight.is_meta:  # shape-only construction (quanta.load's record checks): no codes to read
        return -1
    version = weight._version
    if cached is not None and cached[0] == version:
        return cached[1]
    if weight.numel() == 0:
        peak = 0
    else:  # (abs() of int8 -128 wraps: compare both ends instead)
        lo, hi = torch.aminmax(weight)
        peak = max(int(hi), -int(lo))
    try:
        weight._quanta_code_max = (version, peak)
    except (AttributeError, RuntimeError):  # a tensor subclass that takes no attributes: measured per call
        pass
    return peak


class SaturationProbe:
    """Once per process and weight bound: does ``kernel(x_u8 [M, K], w_s8 [N, K]) -> sums [M, N]``
    (unit scales, zero points 0) return the exact sums of `adversarial_operands`? ``reason(b)`` is
    None where it does for weights within ``±b``, else why not (the kernel saturating, or failing
    to run at all)."""

    def __init__(self, library: str, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.library = library
        self.kernel = kernel
        self._reasons: dict[int, str | None] = {}

    def reason(self, weight_max: int = FULL_RANGE_MAX) -> str | None:
        """Why sums of weights within ``±weight_max`` are not exact here, or None (probed once per
        `probe_bound`)."""
        bound = probe_bound(weight_max)
        if bound not in self._reasons:
            self._reasons[bound] = self._probe(bound)
        return self._reasons[bound]

    def exact(self, weight_max: int = FULL_RANGE_MAX) -> bool:
        return self.reason(weight_max) is None

    def exact_bound(self) -> int | None:
        """The largest probed weight bound that sums exactly here (`FULL_RANGE_MAX`, `SEVEN_BIT_MAX`)
        or None."""
        return next((b for b in (FULL_RANGE_MAX, SEVEN_BIT_MAX) if self.exact(b)), None)

    def limits(self) -> str | None:
        """What this CPU keeps the kernel from summing exactly, in words (None: nothing)."""
        full = self.reason(FULL_RANGE_MAX)
        if full is None:
            return None
        if self.exact(SEVEN_BIT_MAX):
            return (f"exact only for weights within ±{SEVEN_BIT_MAX} on this CPU (7-bit weights); "
                    f"full-range weights: {full}")
        return self.reason(SEVEN_BIT_MAX)

    def refusal(self, weight: torch.Tensor) -> str | None:
        """None where the kernel sums these int8 weight codes exactly here, else why not. Where the
        full range is exact the weight is not read at all."""
        if self.exact(FULL_RANGE_MAX):
            return None
        peak = weight_code_max(weight)
        if peak < 0:
            return "weight codes never measured outside torch.compile (their bound decides exactness here)"
        why = self.reason(peak)
        if why is None:
            return None
        return (f"weight codes up to ±{peak}: {why} (weights within ±{SEVEN_BIT_MAX}, e.g. weight_bits=7, "
                "would be exact)")

    def _probe(self, bound: int) -> str | None:
        worst = 0.0
        for k in (PROBE_K, PROBE_K_ODD):
            x, w, exact = adversarial_operands(k=k, weight_max=bound)
            try:
                with torch.no_grad():
                    got = self.kernel(x, w).double()
            except Exception as err:
                return f"{self.library}'s u8×s8 kernel failed on this CPU ({type(err).__name__}: {err})"
            if got.shape != exact.shape:
                return f"{self.library}'s u8×s8 kernel returned shape {tuple(got.shape)}, not {tuple(exact.shape)}"
            worst = max(worst, float((got - exact).abs().max()))
        if worst == 0:
            return None
        vnni = cpu_vnni_features()
        if not vnni:
            return f"{SATURATES} (this CPU has none of {', '.join(VNNI_FEATURES)})"
        return f"{self.library}'s u8×s8 sums are not exact on this CPU (off by up to {worst:g}; it has {', '.join(vnni)})"


__all__ = ["FULL_RANGE_MAX", "PROBE_K", "PROBE_K_ODD", "SATURATES", "SEVEN_BIT_MAX", "VNNI_FEATURES", "SaturationProbe",
           "adversarial_operands", "cpu_vnni_features", "probe_bound", "weight_code_max"]
