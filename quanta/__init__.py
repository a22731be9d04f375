"""quanta: quantize trained PyTorch models, with the accuracy loss measured and under control."""

from .core import QuantSpec
from .nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer
from .transforms import CoverageReport, QuantConfig, calibrate, coverage, fold_batchnorm, prepare, quant_modules

__version__ = "0.1.0"

__all__ = [
    "CoverageReport", "LayerQuantConfig", "QuantConfig", "QuantDescriptor", "QuantSpec",
    "TensorQuantizer", "calibrate", "coverage", "fold_batchnorm", "prepare", "quant_modules",
]
