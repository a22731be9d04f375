"""Words with one meaning each across quanta's source (see `IntegerModule.pack`,
`transforms.convert._float_twin`, `KernelOp.__call__`): *float twin* is the float module that
stands for a quantized / integer layer; *pack* lays buffers out for this machine's kernels, and
several codes per byte is *bit packing*; *checked* means arguments already validated by a guard."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import quanta

ROOT = Path(quanta.__file__).parent
#: where the float twin lives: made by to_float / convert, put back by the speed check
FLOAT_TWIN_FILES = {"nn/modules/base.py", "transforms/convert.py", "transforms/speed_check.py"}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in ROOT.rglob("*.py")}


def _identifiers(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
    return out


def test_twin_names_only_the_float_twin():
    users = {path for path, text in _sources().items()
             if any("twin" in name for name in _identifiers(ast.parse(text)))}
    assert users <= FLOAT_TWIN_FILES, f"'twin' means the float twin only: {sorted(users - FLOAT_TWIN_FILES)}"


def test_several_codes_per_byte_is_bit_packing():
    loose = re.compile(r"(?<!bit-)packed (two|\d) per byte")
    bad = sorted(path for path, text in _sources().items() if loose.search(text))
    assert not bad, f"say 'bit-packed' for several codes per byte: {bad}"


def test_no_function_is_named_checked():
    defs = {path for path, text in _sources().items()
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.lstrip("_") == "checked"}
    assert not defs, f"'checked' means arguments already validated (KernelOp's checked=): rename in {sorted(defs)}"
