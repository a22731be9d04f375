"""Trained demo weights, cached under the user's cache folder so that only the first
`quanta demo` trains: ``<cache_root()>/demo/<model>-<key>.pt`` (`quanta.kernels.build.cache_root`,
``$QUANTA_CACHE_DIR`` when set). The key hashes the model's class and constructor arguments,
the data's bytes, the training recipe, the seed and the quanta and torch versions; a file that
cannot be read back (truncated, corrupt, other shapes) is trained again and rewritten."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..kernels.build import cache_root


def demo_cache_dir() -> Path:
    return cache_root() / "demo"


def cache_key(model: nn.Module, init: dict[str, Any], data: tuple[torch.Tensor, ...], recipe: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": type(model).__qualname__, "init": init, "recipe": recipe, "quanta": __version__,
                         "torch": torch.__version__.split("+")[0]}, sort_keys=True).encode())
    for t in data:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train(model: nn.Module, init: dict[str, Any], data: tuple[torch.Tensor, ...], recipe: dict[str, Any],
                  train: Callable[[nn.Module], nn.Module], log: Callable[[str], None],
                  cache_dir: Path | None = None) -> tuple[nn.Module, bool]:
    """``(model in eval mode, True if its weights came from the cache)``. ``train`` trains
    ``model`` in place; its result is written to the cache atomically."""
    folder = cache_dir if cache_dir is not None else demo_cache_dir()
    path = folder / f"{type(model).__name__}-{cache_key(model, init, data, recipe)}.pt"
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            return model.eval(), True
        except Exception as e:
            log(f"cached weights {path} unreadable ({type(e).__name__}); training again")
    trained = train(model).eval()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(trained.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache folder costs a retrain next time, nothing more
        log(f"could not cache the trained weights in {folder}: {e}")
    return trained, False
