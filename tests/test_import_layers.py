"""The package's import graph (every import statement, function-local ones included, read from the
source): the cycles once hidden behind function-local imports stay broken, and no module imports
the package root for its version."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "quanta"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of quanta that ``path`` imports anywhere in its body (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("quanta"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import conv_native`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("quanta"))
    return out


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


@pytest.mark.parametrize("a, b", [
    ("quanta.kernels.conv", "quanta.kernels.conv_native"),
    ("quanta.nn.modules.base", "quanta.nn.modules.functional"),
    ("quanta.transforms.prepare", "quanta.transforms.coverage"),
])
def test_former_cycles_stay_broken(a: str, b: str) -> None:
    assert not (b in GRAPH[a] and a in GRAPH[b]), f"{a} and {b} import each other"


def test_no_module_imports_the_package_root() -> None:
    offenders = sorted(m for m, deps in GRAPH.items() if m != "quanta" and "quanta" in deps)
    assert offenders == [], f"import quanta._version instead of the package root in {offenders}"


@pytest.mark.parametrize("module", ["quanta.kernels.conv_native", "quanta.nn.modules.functional",
                                    "quanta.transforms.coverage"])
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
