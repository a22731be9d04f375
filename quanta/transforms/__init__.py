"""Model-level rewrites: prepare, calibrate, coverage, BatchNorm folding, the quant_modules patch."""

from . import quant_modules
from .calibrate import calibrate
from .config import QuantConfig
from .coverage import CoverageReport, coverage
from .fold_bn import fold_batchnorm
from .prepare import prepare

__all__ = ["CoverageReport", "QuantConfig", "calibrate", "coverage", "fold_batchnorm", "prepare",
           "quant_modules"]
