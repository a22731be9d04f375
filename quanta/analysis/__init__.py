"""Error analysis: where quantization loses accuracy, layer by layer (`compare`), by trial
(`sensitivity`), and between a model and its ONNX export (`compare_onnx`)."""

from .auto import AutoQuantResult, Trial, auto_quantize
from .capture import Captured, capture_outputs
from .compare import CompareReport, LayerError, compare
from .onnx_parity import OnnxParityReport, ParityRow, compare_onnx
from .report import ReportFiles, report
from .sensitivity import SensitivityReport, SensitivityRow, sensitivity
from .stages import StageReport, compare_stages

__all__ = [
           "AutoQuantResult",
           "Captured",
           "CompareReport",
           "LayerError",
           "OnnxParityReport",
           "ParityRow",
           "ReportFiles",
           "SensitivityReport",
           "SensitivityRow",
           "StageReport",
           "Trial",
           "auto_quantize",
           "capture_outputs",
           "compare",
           "compare_onnx",
           "compare_stages",
           "report",
           "sensitivity",
]
