"""Fuzzing `quanta.load` (fixed seed, a few hundred cases): every mutated file is refused with a
`QuantaFileError` or loads with outputs identical to the original's (deliberate edits, whose
manifest checksum is recomputed: valid values only); no crash, no hang, bounded memory.
The longer run is ``python benchmarks/fuzz_load.py --cases 1000``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_load.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_load", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutated_files_are_refused_cleanly_or_load_identical(fuzz, tmp_path):
    names = ["cnn-static_int8", "residual-cnn-static_int8", "lstm-dynamic_int8", "transformer-weight_only_int4"]
    result = fuzz.run(240, seed=0, deliberate_share=0.3, timeout=30, memory_mb=150, names=names,
                      workdir=str(tmp_path))
    counts = result["counts"]
    assert not result["failures"], fuzz.summary(result) + "\n" + "\n".join(result["failures"][:10])
    assert sum(counts.values()) == 240
    assert counts.get("refused", 0) > 150 and counts.get("identical", 0) > 0

