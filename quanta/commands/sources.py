"""Where the command line gets models, calibration data and example inputs from.

A model spec is ``package.module:factory`` (imported like ``python -m`` would, the current
directory first on the path) or ``path/to/file.py:factory``; the factory is called with no
arguments and returns a model or ``(model, calibration_data)``. A ``.pt2`` file written by
``torch.export.save`` is a model too (`quanta.commands.exported`: its layers recovered; its example
input is the default input). ``--hf DIR`` reads a directory written by transformers'
``save_pretrained``, offline.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import CommandError
from .images import ImageOptions, load_image_folder


def _import_target(spec: str) -> Any:
    """The object that ``module:attribute`` (or ``file.py:attribute``) names."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise CommandError(f"model spec {spec!r} is not of the form package.module:factory or file.py:factory")
    where, attr = spec.split(":")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise CommandError(f"model spec {spec!r}: no file {where}")
        name = f"_quanta_spec_{path.stem}"
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise CommandError(f"model spec {spec!r}: cannot import {where}")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise CommandError(f"model spec {spec!r}: no module named {e.name!r}") from e
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CommandError(f"model spec {spec!r}: {where} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def load_spec(spec: str) -> tuple[nn.Module, Any]:
    """``(model, calibration_data or None)`` from a model spec or a ``.pt2`` program file; the
    model in eval mode."""
    if isinstance(spec, str) and spec.lower().endswith(".pt2"):
        from .exported import load_exported

        return load_exported(spec), None
    target = _import_target(spec)
    made = target if isinstance(target, nn.Module) else target() if callable(target) else target
    calib = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, calib = made
    if not isinstance(made, nn.Module):
        raise CommandError(f"model spec {spec!r} returned {type(made).__name__}, "
                           "not an nn.Module or (nn.Module, calibration_data)")
    return made.eval(), calib


def spec_factory(spec: str) -> Any:
    """A no-argument factory of fresh float models for `quanta.load`'s ``model=``."""
    return lambda: load_spec(spec)[0]


def load_hf(directory: str) -> nn.Module:
    """The transformers model saved in ``directory`` (its recorded architecture class, else
    ``AutoModel``), loaded offline, in eval mode."""
    try:
        import transformers
    except ImportError as e:
        raise CommandError("--hf needs the transformers package: pip install transformers") from e
    if not pathlib.Path(directory, "config.json").is_file():
        raise CommandError(f"--hf {directory}: not a directory written by save_pretrained (no config.json)")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    return cls.from_pretrained(directory, local_files_only=True).eval()


def _batches(data: Any, batch_size: int, source: str) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CommandError(f"{source}: the tensor has no samples (shape {tuple(data.shape)})")
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return list(data)
    raise CommandError(f"{source}: expected a tensor [N, ...] or a non-empty list of tensors, "
                       f"got {type(data).__name__}")


def load_calibration(path: str, batch_size: int, images: ImageOptions | None = None,
                     model: nn.Module | None = None, max_batches: int | None = None) -> Sequence[torch.Tensor]:
    """Calibration batches from a ``.pt`` (read with ``weights_only=True``), ``.npy`` or
    ``.safetensors`` file: one tensor [N, ...] is split into batches of ``batch_size``; a list of
    tensors (several safetensors entries: in key order) is used as the batches. A folder holds
    images (`quanta.commands.images`, read as ``images`` says, sized for ``model`` by default;
    only the first ``max_batches`` batches are read when given)."""
    file = pathlib.Path(path)
    if file.is_dir():
        limit = batch_size * max_batches if max_batches is not None else None
        return load_image_folder(path, batch_size, images or ImageOptions(), model, limit)
    if not file.is_file():
        raise CommandError(f"--calib {path}: no such file")
    suffix = file.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            data = torch.load(file, weights_only=True, map_location="cpu")
        elif suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(file, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            entries = load_file(file)
            data = [entries[k] for k in sorted(entries)]
            data = data[0] if len(data) == 1 else data
        else:
            raise CommandError(f"--calib {path}: unknown kind of file (use .pt, .npy or .safetensors)")
    except CommandError:
        raise
    except Exception as e:  # a corrupt or pickled file: say which and why, on one line
        raise CommandError(f"--calib {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from e
    return _batches(data, batch_size, f"--calib {path}")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` → ``(1, 3, 32, 32)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CommandError(f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 1,3,32,32")
    return shape


def first_batch(calib: Iterable[Any] | None) -> Any:
    """The first batch of some calibration data (None without any)."""
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor):
        return calib[:1]
    return next(iter(calib), None)


def example_input(shape: str | None, calib: Iterable[Any] | None, command: str,
                  model: nn.Module | None = None) -> Any:
    """An input to run the model on: random normal of ``--input-shape`` when given, else the
    first calibration batch (its inputs, when it is an ``(inputs, targets)`` pair), else the
    example input a ``.pt2`` program was exported with."""
    if shape is not None:
        return torch.randn(parse_shape(shape), generator=torch.Generator().manual_seed(0))
    batch = first_batch(calib)
    exported = getattr(model, "quanta_example_inputs", None)
    if batch is None and isinstance(exported, tuple) and len(exported) == 1:
        return exported[0]
    if batch is None:
        raise CommandError(f"{command} needs --input-shape (the model spec gives no calibration data to take "
                           "an input from)")
    return batch[0] if isinstance(batch, (tuple, list)) else batch
