"""Which fast loop the native int8 gemv (``csrc/gemv.cpp``) has on this build, and up to how many
activation rows it beats the other exact int8 linears there (`quanta.kernels.linear`'s
``gemv_native`` guard; the native recurrent loop's per-step product is the same kernel).

- ``avx512_vnni``: ``vpdpbusd``, four u8 x s8 products into each int32 lane.
- ``avx2``: both operands widened to int16, ``vpmaddwd`` (pairs of int16 products summed into
  int32, exact for full 8-bit weights; ``vpmaddubsw`` would saturate its int16 pair sums).
- ``none``: a plain loop; not offered.
"""

from __future__ import annotations

from . import native

#: rows up to which ``gemv_native`` beats ``torch._int_mm`` (measured on AVX-512 VNNI, 2 threads,
#: BERT and 4096 x 4096 weights: M = 1 0.22 vs 0.23 ms, M = 2..8 0.22-0.77 vs 1.5-3.5 ms at 4096²;
#: 1.3-2.8x faster at BERT shapes for M <= 8, level at M = 16); up to 16 for weights of >= 2^22
GEMV_MAX_ROWS, GEMV_MAX_ROWS_LARGE = 8, 16
#: the same on AVX2 without VNNI, where the alternative is ``float_sums`` (float32 GEMMs on the
#: codes, the weight converted at each call), measured by ``benchmarks/gemv_avx2.py`` (AMD EPYC,
#: shared machine, min of interleaved calls): gemv / float_sums at M = 1..32 0.02-0.49 (1 and 2
#: threads; 4096², 2048 x 512, 3072 x 768, 768²), and still 0.2-0.9 up to M = 512; fp32 F.linear is
#: slower than the gemv too (4096² M = 1: 0.79 vs 2.86 ms, 1 thread). Held at 32 rows.
GEMV_MAX_ROWS_AVX2, GEMV_MAX_ROWS_AVX2_LARGE = 32, 32
#: ... and where the weight is also prepacked for oneDNN (7-bit weights: exact without VNNI), the
#: rows up to which the gemv beats it (1 thread, min: 4096² M = 1 / 8 / 16 / 32: 0.97 / 3.7 / 7.4 /
#: 18.4 vs 4.1 / 5.5 / 7.3 / 14.6 ms; 3072 x 768: 0.11 / 0.38 / 0.73 / 1.45 vs 0.44 / 0.64 / 0.87 / 1.29)
GEMV_MAX_ROWS_AVX2_VS_ONEDNN = 16
#: N * K from which a weight counts as large (streamed from DRAM at every call)
LARGE_WEIGHT = 2**22


def gemv_isa() -> str:
    """``"avx512_vnni"``, ``"avx2"`` or ``"none"`` (also without the native library)."""
    if not native.ready():
        return "none"
    mod = native.module()
    if hasattr(mod, "gemv_isa"):
        return str(mod.gemv_isa())
    return "avx512_vnni" if mod.gemv_has_vnni() else "none"


def gemv_max_rows(n: int, k: int, onednn_packed: bool = False) -> int:
    """Rows up to which the native gemv runs an [N, K] weight on this build (0: not offered);
    ``onednn_packed``: the weight is also prepacked for oneDNN, the next exact kernel."""
    large = n * k >= LARGE_WEIGHT
    isa = gemv_isa()
    if isa == "avx512_vnni":
        return GEMV_MAX_ROWS_LARGE if large else GEMV_MAX_ROWS
    if isa == "avx2":
        limit = GEMV_MAX_ROWS_AVX2_LARGE if large else GEMV_MAX_ROWS_AVX2
        return min(limit, GEMV_MAX_ROWS_AVX2_VS_ONEDNN) if onednn_packed else limit
    return 0


__all__ = ["GEMV_MAX_ROWS", "GEMV_MAX_ROWS_AVX2", "GEMV_MAX_ROWS_AVX2_LARGE", "GEMV_MAX_ROWS_AVX2_VS_ONEDNN",
           "GEMV_MAX_ROWS_LARGE", "LARGE_WEIGHT", "gemv_isa", "gemv_max_rows"]
