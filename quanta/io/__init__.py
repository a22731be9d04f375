"""Saving, loading and inspecting quanta models (one safetensors file), and ONNX export."""

from __future__ import annotations

from typing import Any

from .architecture import ArchitectureError
from .inspect_file import FileReport, inspect
from .records import UnsupportedModuleError
from .safe_file import FORMAT_VERSION, QuantaFileError
from .save_load import load, save


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """See `quanta.io.onnx_export.export_onnx` (needs the ``onnx`` extra)."""
    from .onnx_export import export_onnx as _export

    return _export(*args, **kwargs)


def compare_onnx(*args: Any, **kwargs: Any) -> Any:
    """See `quanta.analysis.onnx_parity.compare_onnx` (needs the ``onnx`` extra); kept here
    because ``quanta.io.compare_onnx`` was public before the parity report moved to analysis
    (imported when called: io does not import analysis at import time)."""
    from ..analysis.onnx_parity import compare_onnx as _compare

    return _compare(*args, **kwargs)


__all__ = ["ArchitectureError", "FORMAT_VERSION", "FileReport", "QuantaFileError", "UnsupportedModuleError",
           "compare_onnx", "export_onnx", "inspect", "load", "save"]
