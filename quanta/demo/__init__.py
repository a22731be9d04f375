"""Small real models and offline data shared by `quanta demo` and the tests.

Names are imported on first use, so that ``quanta.demo.models`` (what a saved demo model
needs to load) does not import the training code or scikit-learn."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"digits": "data", "fashion_mnist": "data", "majority_tokens": "data", "sine_sequences": "data",
          "stdlib_docstrings": "data", "DigitsCNN": "models", "DocstringTransformer": "models",
          "SequenceLSTM": "models", "TinyTransformer": "models", "accuracy": "train", "train_classifier": "train"}

__all__ = ["accuracy", "digits", "DigitsCNN", "DocstringTransformer", "fashion_mnist", "majority_tokens",
           "SequenceLSTM", "sine_sequences", "stdlib_docstrings", "TinyTransformer", "train_classifier"]
assert sorted(__all__) == sorted(_WHERE)  # (one list of the lazily imported names)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'quanta.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
