"""quanta's native CPU kernels: the element-wise work around an int8 GEMM, one pass each.

PyTorch ships fast int8 GEMMs (``torch._int_mm``, oneDNN) but nothing that quantizes a float
activation per token, or turns an int32 accumulator into the float output, in one pass: written
as tensor operations these take 5-15 calls and as many passes over memory, which at BERT shapes
cost more than the GEMM itself saves. ``csrc/fused.cpp`` does each in one pass, with exactly the
float32 arithmetic of the Python implementations (the kernel tests check equality bit for bit).

The library is built when quanta is installed (``setup.py``: ``quanta/kernels/_native*.so``,
2-5 minutes on 2 cores) and loaded on first use, silently. A library is used only if the
build key compiled into it (`build_config`: sources, flags, torch, Python, CPU) matches the
installed sources and this machine; otherwise, or where none was installed, it is built once per
environment on first use (`build`: a locked, bounded build that says what it is doing). Where it
cannot be had (no compiler, another OS, the build timed out) or ``QUANTA_NATIVE=0`` is set, the
Python implementations run: same numbers, slower. `status()` says which and why, `info()` where
the library came from (``quanta doctor`` prints both); integer modules' ``kernel_counts`` name the
implementation that ran (``native`` / ``int_mm_native``).

Interfaces (CPU, float32; see ``csrc/fused.cpp``)::

    quantize_rows(x [M, K], qmin, qmax, symmetric, signed) -> [codes, scale [M, 1], zp [M, 1]] | []
    quantize_static(x dense, inv_scale, zero_point, qmin, qmax, signed) -> codes (x's strides)
    rescale_rows(acc int32 [M, N], x_zp, w_sum, x_scale, w_scale, bias) -> float32 view of acc
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import build_config as cfg

LOG = logging.getLogger("quanta.kernels")
ENV_SWITCH = "QUANTA_NATIVE"

_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "tried": False, "why": "not built yet", "path": None, "origin": "",
                          "refused": None}


@dataclass(frozen=True)
class NativeInfo:
    """Where this process's native library came from (`info`)."""

    status: str  # "loaded" or why not
    path: str | None  # the library file loaded
    origin: str  # "installed" (built by setup.py), "built for this environment" (cache), ""
    key: str  # the build key this environment needs
    refused: str | None  # why an installed library was not used, if one was refused
    cache_dir: str  # this environment's just-in-time build folder


def _disabled_reason() -> str | None:
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.system() != "Linux":
        return f"native kernels are built on Linux only (this is {platform.system()})"
    missing = cfg.missing_sources()
    if missing:
        return f"sources {missing} are missing from the installation ({cfg.CSRC})"
    return None


def ensure(build: bool = True) -> Any:
    """Load the native library (building it first where no matching one exists, unless
    ``build=False``); returns it, or ``None`` when it cannot be had (`status` says why).
    Tried once per process; thread-safe."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        why = _disabled_reason()
        if why is None:
            from .build import BuildTimeout
            try:
                why = _load_or_build(build)
            except BuildTimeout as e:
                why = f"not built: {e}"
                LOG.warning("quanta: native CPU kernels %s; using the (slower) PyTorch implementations", why)
            except Exception as e:  # no compiler / ninja / headers: the Python kernels run instead
                why = f"could not be built: {' '.join(str(e).split())[:600]}"
                LOG.warning("quanta: native CPU kernels %s; using the (slower) PyTorch implementations", why)
            if why is not None and why.startswith("not built in this environment"):
                _state["why"] = why
                return None  # (build=False: a later ensure() may still build)
        _state["why"] = why or "loaded"
        _state["tried"] = True
    return _state["module"]


def installed_library() -> Path | None:
    """The library ``setup.py`` built into the package, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name(cfg.AOT_MODULE.rpartition(".")[2] + suffix)
        if path.exists():
            return path
    return None


def check_library(path: str | Path, key: str) -> str | None:
    """Why the library at ``path`` must not be loaded for build key ``key`` (None: it matches)."""
    found = cfg.embedded_key(path)
    if found is None:
        return f"{path} holds no build key (built by another version of quanta)"
    if found != key:
        return (f"{path} was built from other sources or for another torch, Python or CPU "
                f"(key {found}, this environment needs {key})")
    return None


def jit_spec(key: str) -> Any:
    from .build import BuildSpec
    return BuildSpec(name=f"quanta_native_{key}", sources=tuple(str(p) for p in cfg.SOURCES),
                     cflags=tuple(cfg.compile_flags() + [cfg.key_flag(key)]), ldflags=tuple(cfg.LDFLAGS))


def _load_or_build(build: bool) -> str | None:
    """Load the installed library, else this environment's cached one, else build it; returns
    why none was loaded (None: loaded)."""
    from ..progress import notice
    from . import build as jit

    key = cfg.build_key(torch.__version__)
    installed = installed_library()
    if installed is not None:
        _state["refused"] = check_library(installed, key)
        if _state["refused"] is None:
            return _load(installed, cfg.AOT_MODULE, "installed")
    spec = jit_spec(key)
    target = jit.library_path(spec)
    if target.exists():
        if check_library(target, key) is None:
            return _load(target, spec.name, "built for this environment")
        target.unlink()  # (a damaged file: build it again)
    if not build:
        return (f"not built in this environment ({_state['refused'] or 'no library was installed'}); "
                "first use builds it, or `quanta doctor --build`")
    if _state["refused"]:
        notice(f"not using the installed native library: {_state['refused']}")
    path = jit.build_library(spec)
    reason = check_library(path, key)
    if reason is not None:
        raise RuntimeError(reason)
    return _load(path, spec.name, "built for this environment")


def _load(path: Path, name: str, origin: str) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{path} is not a loadable Python extension")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    _state.update(module=mod, path=str(path), origin=origin)
    from .graph_ops import register_fakes
    register_fakes()  # (the library defines the graph operators; their shapes are told here)


def info() -> NativeInfo:
    """Where the native library came from, for `quanta doctor` (call `ensure` first)."""
    from .build import env_cache_dir
    try:
        key = cfg.build_key(torch.__version__)
    except OSError as e:  # (sources missing from the installation: `status` says so)
        key = f"unknown ({e.strerror}: {e.filename})"
    return NativeInfo(status=status(), path=_state["path"], origin=_state["origin"], key=key,
                      refused=_state["refused"], cache_dir=str(env_cache_dir()))


def ready() -> bool:
    """Whether the library is loaded (never builds: cheap enough for every kernel call)."""
    return _state["module"] is not None


def module() -> Any:
    """The loaded library (call `ensure` first)."""
    mod = _state["module"]
    if mod is None:
        raise RuntimeError(f"quanta native kernels are not loaded: {status()}")
    return mod


def status() -> str:
    """``"loaded"``, or why the native kernels are not in use."""
    return str(_state["why"])


__all__ = ["ENV_SWITCH", "NativeInfo", "check_library", "ensure", "info", "installed_library", "module", "ready",
           "status"]
