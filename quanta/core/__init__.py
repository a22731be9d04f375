"""Pure quantization numerics on tensors (no nn.Module): specs, qparams, (fake) quantization,
gradients and bit packing. See README "Numerics" for the conventions."""

from .formats import FP8_DTYPES, fp8_max, max_level, storage_dtype
from .granularity import Layout, compact_shape, normalize_axis
from .packing import pack_bits, unpack_bits
from .qparams import check_finite, choose_qparams, compute_range, global_range
from .quantize import QTensor, dequantize, fake_quantize, lsq_grad_factor, quantize, quantize_tensor
from .rounding import round_values
from .spec import Format, Granularity, QuantSpec, Rounding, qrange

__all__ = [
    "FP8_DTYPES", "Format", "Granularity", "Layout", "QTensor", "QuantSpec", "Rounding",
    "check_finite", "choose_qparams", "compact_shape", "compute_range", "dequantize",
    "fake_quantize", "fp8_max", "global_range", "lsq_grad_factor", "max_level", "normalize_axis",
    "pack_bits", "qrange", "quantize", "quantize_tensor", "round_values", "storage_dtype",
    "unpack_bits",
]
