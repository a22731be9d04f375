"""The opt-in patch of ``torch.nn`` (NVIDIA pytorch-quantization's ``quant_modules``).

``initialize()`` replaces ``torch.nn.<Name>`` classes by their quantized versions so that
models built afterwards contain quantized layers; ``deactivate()`` puts the originals back.
``enabled()`` does both around a block, restoring in ``finally``. Only the ``torch.nn``
attributes (and the entries of ``custom_quant_modules``) are patched: code that captured a
class before ``initialize()`` (``from torch.nn import Linear`` at import time, torch's own
internal references) keeps the float class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch.nn

from ..nn.registry import BUILTIN_QUANT_CLASSES

# Every built-in quantized class but the encoder layer (whose own submodules torch builds from
# names captured at import time, so patching it alone would give a half-quantized layer).
_DEFAULT_MODULES: tuple[tuple[Any, str, type], ...] = tuple(
    (torch.nn, cls.float_type.__name__, cls) for cls in BUILTIN_QUANT_CLASSES
    if cls.float_type is not torch.nn.TransformerEncoderLayer)

_saved: list[tuple[Any, str, Any]] = []


def is_initialized() -> bool:
    return bool(_saved)


def initialize(float_module_list: Iterable[str] | None = None,
               custom_quant_modules: Sequence[tuple[Any, str, type]] | None = None) -> None:
    """Patch ``torch.nn`` so new models get quantized modules.

    ``float_module_list``: names (``"Linear"``, ``"LSTM"``) to leave alone;
    ``custom_quant_modules``: extra ``(module_or_namespace, attribute_name, replacement)``
    triples to patch the same way.
    """
    if _saved:
        raise RuntimeError("quant_modules is already initialized; call deactivate() first")
    custom = list(custom_quant_modules or ())
    for entry in custom:  # validated before use, so a malformed entry gets a clear message
        if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[1], str)):
            raise TypeError("custom_quant_modules entries must be (module, name, replacement) triples, "
                            f"got {entry!r}")
        if not hasattr(entry[0], entry[1]):
            raise ValueError(f"custom_quant_modules: {entry[0]!r} has no attribute {entry[1]!r}")
    if isinstance(float_module_list, str):
        float_module_list = [float_module_list]
    skip = set(float_module_list or ())
    known = {name for _, name, _ in _DEFAULT_MODULES}
    unknown = sorted(skip - known - {name for _, name, _ in custom})
    if unknown:
        raise ValueError(f"float_module_list names unknown module(s) {unknown}; known: {sorted(known)}")
    entries = [e for e in _DEFAULT_MODULES if e[1] not in skip]
    for entry in custom:
        entries = [e for e in entries if not (e[0] is entry[0] and e[1] == entry[1])] + [entry]
    try:
        for owner, name, replacement in entries:
            _saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
    except BaseException:
        deactivate()
        raise


def deactivate() -> None:
    """Restore every patched attribute (a no-op when nothing is patched)."""
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)


@contextlib.contextmanager
def enabled(float_module_list: Iterable[str] | None = None,
            custom_quant_modules: Sequence[tuple[Any, str, type]] | None = None) -> Iterator[None]:
    """``with quanta.quant_modules.enabled(): model = Net()`` builds a quantized model."""
    initialize(float_module_list, custom_quant_modules)
    try:
        yield
    finally:
        deactivate()
