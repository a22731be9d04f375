"""Every ```python block of the workflow pages in docs/ runs as written: each page's blocks in
order, in one namespace, in a fresh working directory.

`torch.compile` runs with its ``eager`` backend here: the snippets check that quanta's modules
trace, without the minutes inductor's C++ compilation takes on a small CPU (inductor itself is
tested in tests/integer and tests/transforms)."""

from __future__ import annotations

import functools
import pathlib
import re

import pytest
import torch

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = ("ptq", "qat", "distributed", "algorithms", "analysis", "deployment")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: pathlib.Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


def test_every_workflow_page_exists_and_has_snippets():
    for name in PAGES:
        assert len(python_blocks(DOCS / f"{name}.md")) >= 2, name


def test_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n")
    assert python_blocks(page) == ["a = 1\n", "b = a + 1\n"]


@pytest.mark.parametrize("name", PAGES)
def test_page_snippets_run(name, tmp_path, monkeypatch):
    blocks = python_blocks(DOCS / f"{name}.md")
    for needed in ("transformers", "onnxruntime", "matplotlib"):
        if any(re.search(rf"^\s*(import|from) {needed}\b", b, re.MULTILINE) for b in blocks):
            pytest.importorskip(needed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    namespace: dict = {"__name__": f"docs_{name}"}
    with torch.random.fork_rng(devices=[]):
        for i, block in enumerate(blocks):
            code = compile(block, f"docs/{name}.md[python block {i + 1}]", "exec")
            exec(code, namespace)
