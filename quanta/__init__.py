"""quanta: quantize trained PyTorch models, with the accuracy loss measured and under control."""

from .core import QuantSpec
from .nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer
from .integer import storage_bytes
from .io import compare_onnx, export_onnx, inspect, load, save
from .analysis import auto_quantize, compare, report, sensitivity
from .transforms import (
    PRESETS, CoverageReport, QATConfig, QuantConfig, calibrate, conversion_report, convert, coverage, fold_batchnorm,
    finalize_qat, preset, prepare, prepare_qat, quant_modules, quantize,
)

from ._version import __version__

__all__ = [
    "CoverageReport", "LayerQuantConfig", "__version__", "algorithms", "auto_quantize", "compare", "compare_onnx", "report", "sensitivity", "export_onnx", "inspect", "load", "save", "QuantConfig", "QuantDescriptor", "QuantSpec",
    "PRESETS", "QATConfig", "TensorQuantizer", "finalize_qat", "prepare_qat", "calibrate", "conversion_report", "convert", "coverage", "fold_batchnorm",
    "prepare", "preset", "quant_modules", "quantize", "storage_bytes",
]
