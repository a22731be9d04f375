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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import build_config

#: the CPU features that sum u8 × s8 products in int32 (no int16 pair saturation)
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
SATURATES = "u8×s8 pair sums saturate without VNNI"
#: the reduction length of the probe (a multiple of every kernel's pair / quad blocking)
PROBE_K = 64


def adversarial_operands(rows: int = 3, k: int = PROBE_K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, w, exact)``: uint8 activations ``[rows, k]`` all 255 (the last row 0 .. 255 ramping),
    int8 weights ``[4, k]`` (all +127, all -127, alternating ±127, all +1) and the exact sums
    ``x @ w.T`` as float64 ``[rows, 4]``. On a saturating kernel rows of 255 against ±127 give
    ``k / 2 · ±32767`` instead of ``k · ±32385``."""
    x = torch.full((rows, k), 255, dtype=torch.uint8)
    x[-1] = torch.arange(k, dtype=torch.int64).mul(4).clamp(max=255).to(torch.uint8)
    w = torch.full((4, k), 127, dtype=torch.int8)
    w[1] = -127
    w[2, 1::2] = -127
    w[3] = 1
    return x, w, x.double() @ w.double().t()


def cpu_vnni_features() -> list[str]:
    """The `VNNI_FEATURES` this CPU reports (empty off x86 or where /proc/cpuinfo is unreadable)."""
    have = set(build_config.cpu_features())
    return [f for f in VNNI_FEATURES if f in have]


class SaturationProbe:
    """Once per process: does ``kernel(x_u8 [M, K], w_s8 [N, K]) -> sums [M, N]`` (unit scales,
    zero points 0) return the exact sums of `adversarial_operands`? ``reason()`` is None where it
    does, else why not (the kernel saturating, or failing to run at all)."""

    def __init__(self, library: str, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.library = library
        self.kernel = kernel
        self._reason: list[str | None] = []

    def reason(self) -> str | None:
        if not self._reason:
            self._reason.append(self._probe())
        return self._reason[0]

    def exact(self) -> bool:
        return self.reason() is None

    def _probe(self) -> str | None:
        x, w, exact = adversarial_operands()
        try:
            with torch.no_grad():
                got = self.kernel(x, w).double()
        except Exception as err:  # noqa: BLE001 - a kernel that cannot run is not exact either
            return f"{self.library}'s u8×s8 kernel failed on this CPU ({type(err).__name__}: {err})"
        if torch.equal(got, exact):
            return None
        vnni = cpu_vnni_features()
        if not vnni:
            return f"{SATURATES} (this CPU has none of {', '.join(VNNI_FEATURES)})"
        worst = float((got - exact).abs().max())
        return f"{self.library}'s u8×s8 sums are not exact on this CPU (off by up to {worst:g}; it has {', '.join(vnni)})"


__all__ = ["PROBE_K", "SATURATES", "VNNI_FEATURES", "SaturationProbe", "adversarial_operands", "cpu_vnni_features"]
