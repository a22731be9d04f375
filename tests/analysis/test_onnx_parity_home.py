"""The ONNX parity report lives in analysis (it compares, it does not save or load): io keeps
only its public ``quanta.io.compare_onnx`` path as a call-time re-export, and no io module imports
analysis when it is imported."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import quanta
import quanta.io
from quanta.analysis import onnx_parity

IO_DIR = Path(quanta.io.__file__).parent


def test_the_parity_report_has_one_home():
    assert importlib.util.find_spec("quanta.io.onnx_compare") is None
    assert quanta.compare_onnx is onnx_parity.compare_onnx
    assert quanta.analysis.OnnxParityReport is onnx_parity.OnnxParityReport


def test_quanta_io_compare_onnx_still_reaches_it(monkeypatch):
    calls = []
    monkeypatch.setattr(onnx_parity, "compare_onnx", lambda *a, **k: calls.append((a, k)) or "report")
    assert quanta.io.compare_onnx("model", "m.onnx", "x", layers=False) == "report"
    assert calls == [(("model", "m.onnx", "x"), {"layers": False})]


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Relative / absolute targets of the import statements run when the module is imported
    (top level, and inside top-level ``if`` / ``try``; not inside functions or classes)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, (ast.If, ast.Try)):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                continue
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def test_io_imports_no_analysis_at_import_time():
    offenders = {p.name: imp for p in IO_DIR.glob("*.py") for imp in _module_level_imports(ast.parse(p.read_text()))
                 if imp.startswith("..analysis") or imp.startswith("quanta.analysis")}
    assert offenders == {}
