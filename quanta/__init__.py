"""quanta: quantize trained PyTorch models, with the accuracy loss measured and under control."""

from ._version import __version__
from .analysis import auto_quantize, compare, compare_onnx, report, sensitivity
from .core import QuantSpec
from .integer import storage_bytes
from .io import export_onnx, inspect, load, save
from .kernels.threads import ThreadFit, fit_threads, fitted_threads, thread_fit
from .nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer
from .transforms import (
    PRESETS,
    CoverageReport,
    KeptFloat,
    QATConfig,
    QuantConfig,
    calibrate,
    conversion_report,
    convert,
    coverage,
    finalize_qat,
    fold_batchnorm,
    kept_float,
    prepare,
    prepare_qat,
    preset,
    quant_modules,
    quantize,
)

__all__ = [
    "CoverageReport", "LayerQuantConfig", "__version__", "algorithms", "auto_quantize", "compare", "compare_onnx", "report", "sensitivity", "export_onnx", "inspect", "load", "save", "QuantConfig", "QuantDescriptor", "QuantSpec",
    "PRESETS", "QATConfig", "TensorQuantizer", "finalize_qat", "prepare_qat", "calibrate", "conversion_report", "convert", "coverage", "fold_batchnorm",
    "KeptFloat", "kept_float", "prepare", "preset", "quant_modules", "quantize", "storage_bytes",
    "ThreadFit", "fit_threads", "fitted_threads", "thread_fit",
]
