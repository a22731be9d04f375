"""Model-level rewrites: prepare, calibrate, coverage, BatchNorm folding, the quant_modules patch."""

from . import quant_modules
from .calibrate import calibrate
from .config import QuantConfig
from .convert import conversion_report, convert
from .coverage import CoverageReport, coverage
from .float_dtype import run_float_work_in
from .fold_bn import fold_batchnorm
from .prepare import prepare
from .presets import PRESETS, preset
from .qat import QATConfig, finalize_qat, prepare_qat
from .quantize import quantize
from .restore_float import restore_float
from .speed_check import KeptFloat, kept_float

__all__ = ["CoverageReport", "KeptFloat", "PRESETS", "QATConfig", "QuantConfig", "calibrate", "conversion_report", "convert", "coverage",
           "finalize_qat", "fold_batchnorm", "kept_float", "prepare", "prepare_qat", "preset", "quant_modules", "quantize", "restore_float",
           "run_float_work_in"]
