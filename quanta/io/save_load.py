"""`save` / `load`: a quantized (or float, or simulated) model in one safe file.

``save`` writes the model's tensors (integer weights stay integer, int4 bit-packed two per byte)
and a manifest describing every module (see `records`). ``load`` rebuilds the model from the
manifest, on the caller's freshly built float model (``model=``, or a factory) or on one it
constructs from the recorded classes (an allow-list of imports), then fills in the tensors.
The user never calls prepare / convert again, and nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..algorithms.pipeline import ALGORITHMS_ATTR
from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.config import QuantConfig
from ..transforms.convert import REPORT_ATTR
from ..transforms.float_dtype import FLOAT_DTYPE_ATTR, FLOAT_DTYPES, float_dtype_of, run_float_work_in
from ..transforms.prepare import CONFIG_ATTR
from . import safe_file
from .architecture import ArchitectureError, _jsonable, normalize_trusted
from .record_checks import checked_manifest
from .records import compact, describe, rebuild


def model_kind(model: nn.Module) -> str:
    mods = list(model.modules())
    if any(isinstance(m, IntegerModule) for m in mods):
        return "integer"
    if any(isinstance(m, (QuantModule, QuantOp, TensorQuantizer)) for m in mods):
        return "simulated"
    return "float"


def save(model: nn.Module, path: str | os.PathLike[str], *, init_kwargs: dict[str, Any] | None = None,
         unsupported: str = "raise") -> pathlib.Path:
    """Write ``model`` (float, simulated or integer) to ``path`` as one safetensors file.

    ``init_kwargs``: the root class's constructor arguments, when they are not stored on the
    model under the same names (quanta reads them back from attributes otherwise); they let
    ``quanta.load(path)`` rebuild the model without ``model=``. ``unsupported="float"`` stores
    simulated modules of unregistered classes as float (with a warning) instead of raising.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quanta.save expects an nn.Module, got {type(model).__name__}")
    if init_kwargs is not None and (not isinstance(init_kwargs, dict) or not _jsonable(list(init_kwargs.values()))):
        raise TypeError("init_kwargs must be a dict of JSON values (numbers, strings, booleans, None, lists)")
    records, dropped = describe(model, unsupported)
    if init_kwargs is not None:
        records[0]["kwargs"] = dict(init_kwargs)
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p in dropped)}
    tensors, aliases = safe_file.unique_tensors(state)
    config = getattr(model, CONFIG_ATTR, None)
    manifest: dict[str, Any] = {
        "format": safe_file.FORMAT_NAME,
        "format_version": safe_file.FORMAT_VERSION,
        "quanta_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "kind": model_kind(model),
        "architecture": _architecture(model, records, state),
        "config": compact(config.to_dict()) if isinstance(config, QuantConfig) else None,
        "conversion": [_without_timings(dataclasses.asdict(r)) for r in getattr(model, REPORT_ATTR, [])],
        "algorithms": getattr(model, ALGORITHMS_ATTR, []),
        "modules": records,
        "aliases": aliases,
    }
    if float_dtype_of(model) != torch.float32:  # (only then: other files stay byte for byte as they were)
        manifest["float_dtype"] = getattr(model, FLOAT_DTYPE_ATTR)
    safe_file.write(path, tensors, manifest)
    return pathlib.Path(path)


#: speed-check timings inside a conversion report's detail ("(0.123 ms vs float 0.456 ms)"): they
#: differ at every run, and a file is a function of the model alone
_TIMINGS = re.compile(r" \(?\d+(?:\.\d+)? ms vs float \d+(?:\.\d+)? ms\)?")


def _without_timings(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "detail": _TIMINGS.sub("", row["detail"])}


def _version() -> str:
    from .._version import __version__

    return __version__


def _architecture(model: nn.Module, records: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Whether ``load`` can rebuild the model from the records alone: tried now, on the live
    classes (so a class defined in a script or a test counts), and compared tensor by tensor."""
    root = records[0]
    info: dict[str, Any] = {"class": root.get("float_cls", root.get("cls")), "rebuildable": False, "reason": ""}
    classes = {type(m) for m in model.modules()} | {t for m in model.modules() for t in type(m).__mro__
                                                     if isinstance(t, type) and issubclass(t, nn.Module)}
    try:
        with torch.random.fork_rng(devices=[]):  # constructors draw random weights: keep the user's stream
            built = rebuild(None, records, trusted=list(classes))
        _materialize(built, state)
        problem = _mismatch(built, state)
    except (ArchitectureError, ValueError, TypeError) as e:
        problem = str(e)
    if problem:
        info["reason"] = problem
    else:
        info["rebuildable"] = True
    return info


def _materialize(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Parameters the file has and the rebuilt module declares as None (a conv's bias that
    BatchNorm folding created) are created before loading."""
    for key, t in state.items():
        owner_path, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_path) if owner_path else model
        except AttributeError:
            continue
        if attr in owner._parameters and owner._parameters[attr] is None:
            owner._parameters[attr] = nn.Parameter(torch.zeros(t.shape, dtype=t.dtype), requires_grad=t.is_floating_point())


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when ``model``'s state has exactly ``state``'s names and shapes; else the first
    difference, in the model's module order."""
    mine = model.state_dict()
    for key, have in mine.items():
        owner = key.rpartition(".")[0] or "(root)"
        if key not in state:
            return f"module {owner!r}: the model has {key!r} {list(have.shape)}, the file does not"
        t = state[key]
        if tuple(have.shape) != tuple(t.shape):
            return f"module {owner!r}: {key!r} is {list(t.shape)} in the file but {list(have.shape)} in the model"
        if have.dtype != t.dtype and not (have.is_floating_point() and t.is_floating_point()):
            return f"module {owner!r}: {key!r} is {t.dtype} in the file but {have.dtype} in the model"
    for key, t in state.items():
        if key in mine:
            continue
        # a TensorQuantizer creates its range buffers when loading
        if key.rsplit(".", 1)[-1] in ("amax", "amin") and isinstance(_owner(model, key), TensorQuantizer):
            continue
        owner = key.rpartition(".")[0] or "(root)"
        return f"module {owner!r}: the file has {key!r} {list(t.shape)}, the model has no such tensor"
    return ""


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    path = key.rpartition(".")[0]
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def load(path: str | os.PathLike[str], model: nn.Module | Callable[[], nn.Module] | None = None, *,
         trusted: Iterable[Any] | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``, ready to run (integer weights packed for this machine).

    ``model``: a freshly built float model of the saved architecture (it is not modified: a copy
    is used) or a factory returning one; quanta re-applies the recorded quantization itself.
    Without it, the model is constructed from the classes the file records, imported only from
    ``torch.nn``, quanta, and what ``trusted`` names (classes, or module-path prefixes).
    """
    normalize_trusted(trusted)  # the caller's arguments first: a TypeError, not a file error
    tensors, manifest = safe_file.read(path)
    source = os.fspath(path)
    records = manifest["modules"]
    config, report = checked_manifest(manifest, source)
    skeleton, trusted_all = _skeleton(model, manifest, source, trusted)
    entries = {n: safe_file.TensorEntry(n, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
               for n, t in tensors.items()}
    try:
        with torch.random.fork_rng(devices=[]):
            built = rebuild(skeleton, records, trusted_all, entries)
    except ArchitectureError as e:
        raise ArchitectureError(f"{source}: {e}") from e
    _materialize(built, tensors)
    problem = _mismatch(built, tensors)
    if problem:
        raise ArchitectureError(f"{source} does not fit this model: {problem}")
    try:
        built.load_state_dict(tensors, strict=True)
        _retie(built, manifest["aliases"])
    except (RuntimeError, ValueError, TypeError) as e:  # an integer module's pack() refusing its tensors
        raise safe_file.QuantaFileError(f"{source}: the file's tensors do not fit its modules: {str(e)[:300]}") from e
    if config is not None:
        setattr(built, CONFIG_ATTR, config)
    if report:
        setattr(built, REPORT_ATTR, report)
    algorithms = manifest.get("algorithms")
    if isinstance(algorithms, list) and algorithms and all(isinstance(r, dict) for r in algorithms):
        setattr(built, ALGORITHMS_ATTR, algorithms)  # what the PTQ algorithms changed (the weights carry it)
    if "float_dtype" in manifest:  # the float work between integer layers in bfloat16, as saved
        if manifest["float_dtype"] not in FLOAT_DTYPES:
            raise safe_file.QuantaFileError(f"{source}: unknown float_dtype {manifest['float_dtype']!r} "
                                            f"(this quanta knows {', '.join(FLOAT_DTYPES)})")
        run_float_work_in(built, manifest["float_dtype"])
    if device is not None:
        built.to(device)
    return built


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tensors saved once for two names (tied weights) are one tensor again after loading."""
    for alias, target in aliases.items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = target.rpartition(".")
        a, b = model.get_submodule(owner), model.get_submodule(src_owner)
        for table in ("_parameters", "_buffers"):
            shared = getattr(b, table).get(src_attr)
            if shared is not None and attr in getattr(a, table) and getattr(a, table)[attr] is not shared:
                getattr(a, table)[attr] = shared
                if isinstance(a, IntegerModule):
                    a.pack()  # (may re-home the tensor, e.g. in huge pages: both then hold the new one)
                    getattr(b, table)[src_attr] = getattr(a, table)[attr]
                    if isinstance(b, IntegerModule):
                        b.pack()


def _skeleton(model: Any, manifest: dict[str, Any], source: str,
              trusted: Iterable[Any] | None) -> tuple[nn.Module | None, list[Any]]:
    trusted_all = list(trusted or ())
    if model is None:
        arch = manifest.get("architecture") or {}
        if not arch.get("rebuildable"):
            raise ArchitectureError(
                f"{source} records the architecture {arch.get('class', '?')} but not how to rebuild it "
                f"({arch.get('reason') or 'unknown'}): pass model= (a freshly built float model or a factory), "
                "or save with init_kwargs=")
        return None, trusted_all
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model= must be an nn.Module or a factory returning one, got {type(model).__name__}")
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
        skeleton = built
    else:
        skeleton = copy.deepcopy(model)
    trusted_all += [type(m) for m in skeleton.modules()]  # the caller built these classes already
    return skeleton, trusted_all
