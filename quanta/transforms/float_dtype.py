"""Run the float work of an integer model in bfloat16.

Between integer layers a converted transformer still computes in float: LayerNorm, softmax and
the attention between the integer projections, GELU, residual additions, embeddings, and the
layers quanta kept float. `run_float_work_in(model, torch.bfloat16)` (or ``quanta.quantize(...,
float_dtype=torch.bfloat16)``) moves that work to bfloat16:

- every floating parameter and buffer outside the integer modules is cast (an integer module
  keeps its integer weights and float32 scales and bias; a quantizer keeps its float32 range);
- the model's floating inputs are cast at the root (a forward pre-hook), so the float layers see
  bfloat16; integer modules take bfloat16 in and give bfloat16 out (their kernels quantize the
  bfloat16 values, which float32 holds exactly; a floating output of another dtype, e.g. an integer
  embedding's, is cast by a forward hook), so the model's output is bfloat16;
- `coverage` marks each layer that computes in bfloat16, and `quanta.save` records the choice,
  so `quanta.load` returns a model that runs the same way.

It pays where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX on x86, BF16 on Arm):
elsewhere torch emulates it, which works but is slower than float32, and quanta logs so once.
The speed check (`speed_check.keep_faster`) times layers in float32, before this pass.
"""

from __future__ import annotations

import functools
import logging
import platform
from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..nn.tensor_quantizer import TensorQuantizer

#: the float dtypes quanta runs the float work in, by the name a file records
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: attribute of the root: the float dtype's name (read by `coverage` and `quanta.save`)
FLOAT_DTYPE_ATTR = "_quanta_float_dtype"
_HANDLES_ATTR = "_quanta_float_dtype_hooks"

_log = logging.getLogger(__name__)
_WARNED: list[bool] = []  # (the no-native-bfloat16 line: once per process)


def check_float_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` (a ``torch.dtype`` or its name) as a dtype of `FLOAT_DTYPES`, else one clear error."""
    if isinstance(dtype, str) and dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES.values():
        return dtype
    raise ValueError(f"float_dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86: avx512_bf16 or amx_bf16; Arm: bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return platform.system() == "Darwin" and platform.machine() == "arm64"  # Apple M2 and later
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def float_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype `run_float_work_in` set on ``model`` (float32 when it was never applied)."""
    return FLOAT_DTYPES[getattr(model, FLOAT_DTYPE_ATTR, "float32")]


def _cast_float_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    if isinstance(module, (IntegerModule, TensorQuantizer)):
        return  # integer weights, float32 scales and ranges: the integer arithmetic's own numbers
    for p in module.parameters(recurse=False):
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_floating_point() and b.dtype != dtype:
            module._buffers[name] = b.to(dtype)
    for child in module.children():
        _cast_float_tensors(child, dtype)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _outermost_integer_modules(model: nn.Module) -> list[IntegerModule]:
    found: list[IntegerModule] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, IntegerModule):
                found.append(child)
            else:
                walk(child)

    if isinstance(model, IntegerModule):
        return [model]
    walk(model)
    return found


def run_float_work_in(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Make the float work of the integer ``model`` run in ``dtype`` (in place; see the module
    docstring); ``torch.float32`` undoes it (the parameters keep their bfloat16-rounded values)."""
    dtype = check_float_dtype(dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"run_float_work_in expects an nn.Module, got {type(model).__name__}")
    integer = _outermost_integer_modules(model)
    if not integer:
        raise ValueError(f"{type(model).__name__} has no integer modules: convert it first (quanta.quantize / "
                         "quanta.convert), then run its float work in another dtype")
    for handle in model.__dict__.pop(_HANDLES_ATTR, []):
        handle.remove()
    _cast_float_tensors(model, dtype)
    if dtype != torch.float32:
        handles = [model.register_forward_pre_hook(
            lambda _m, args, kwargs: (_cast_floats(args, dtype), _cast_floats(kwargs, dtype)), with_kwargs=True)]
        handles += [m.register_forward_hook(lambda _m, _args, out: _cast_floats(out, dtype)) for m in integer]
        model.__dict__[_HANDLES_ATTR] = handles
        if dtype == torch.bfloat16 and not native_bf16() and not _WARNED:
            _WARNED.append(True)
            _log.warning("quanta: float work in bfloat16 on a CPU without native bfloat16 (no avx512_bf16 / "
                         "amx_bf16): it runs, emulated, slower than float32 here")
    model.__dict__[FLOAT_DTYPE_ATTR] = next(k for k, v in FLOAT_DTYPES.items() if v == dtype)
    return model
