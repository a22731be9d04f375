"""quanta's native CPU kernels: the element-wise work around an int8 GEMM, one pass each.

PyTorch ships fast int8 GEMMs (``torch._int_mm``, oneDNN) but nothing that quantizes a float
activation per token, or turns an int32 accumulator into the float output, in one pass: written
as tensor operations these take 5-15 calls and as many passes over memory, which at BERT shapes
cost more than the GEMM itself saves. ``csrc/fused.cpp`` does each in one pass, with exactly the
float32 arithmetic of the Python implementations (the kernel tests check equality bit for bit).

The library is compiled on first use with ``torch.utils.cpp_extension`` (the C++ compiler and
Python headers that PyTorch extensions need, and ninja, a dependency of quanta; 1-2 minutes on 2 cores, once per machine and torch version; cached in
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Where it cannot be built (no
compiler, another OS) or ``QUANTA_NATIVE=0`` is set, the Python implementations run: same
numbers, slower. `status()` says which and why; integer modules' ``kernel_counts`` name the
implementation that ran (``native`` / ``int_mm_native``).

Interfaces (CPU, float32; see ``csrc/fused.cpp``)::

    quantize_rows(x [M, K], qmin, qmax, symmetric, signed) -> [codes, scale [M, 1], zp [M, 1]] | []
    quantize_static(x dense, inv_scale, zero_point, qmin, qmax, signed) -> codes (x's strides)
    rescale_rows(acc int32 [M, N], x_zp, w_sum, x_scale, w_scale, bias) -> float32 view of acc
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("quanta.kernels")

CSRC = Path(__file__).with_name("csrc")
#: compiled together into one library (fused.cpp holds the Python bindings); common.h is shared
SOURCES = [CSRC / "fused.cpp", CSRC / "gemv.cpp", CSRC / "recurrent.cpp", CSRC / "conv.cpp", CSRC / "conv_dense.cpp",
           CSRC / "conv_depthwise.cpp", CSRC / "linear_op.cpp"]
HEADERS = [CSRC / "common.h", CSRC / "conv_kernels.h", CSRC / "simd.h", CSRC / "activation.h"]
#: no -ffast-math, no FMA contraction: the kernels must round exactly like the PyTorch ops
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
ENV_SWITCH = "QUANTA_NATIVE"

_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "tried": False, "why": "not built yet"}


def _cpu_fingerprint() -> str:
    """What ``-march=native`` compiles for: a build is reused only on the same kind of CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return platform.machine() + flags


def _march() -> list[str]:
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else []


def _disabled_reason() -> str | None:
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.system() != "Linux":
        return f"native kernels are built on Linux only (this is {platform.system()})"
    missing = [p.name for p in SOURCES + HEADERS if not p.exists()]
    if missing:
        return f"sources {missing} are missing from the installation ({CSRC})"
    return None


def ensure() -> Any:
    """Build (first time on this machine) or load the native library; returns it, or ``None``
    when it cannot be had (`status` says why). Tried once per process; thread-safe."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        why = _disabled_reason()
        if why is None:
            try:
                _state["module"] = _build()
                from .graph_ops import register_fakes
                register_fakes()  # (the library defines the graph operators; their shapes are told here)
                why = None
            except Exception as e:  # no compiler / ninja / headers: the Python kernels run instead
                why = f"could not be built: {' '.join(str(e).split())[:300]}"
                LOG.warning("quanta: native CPU kernels %s; using the (slower) PyTorch implementations", why)
        _state["why"] = why or "loaded"
        _state["tried"] = True
    return _state["module"]


def _build() -> Any:
    from torch.utils import cpp_extension

    flags = CFLAGS + _march()
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode() + " ".join(flags).encode()
                         + _cpu_fingerprint().encode()).hexdigest()[:12]
    LOG.info("quanta: loading native CPU kernels (compiled once per machine, 1-2 minutes the first time)")
    _ninja_on_path()
    return cpp_extension.load(name=f"quanta_fused_{key}", sources=[str(p) for p in SOURCES], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=False)


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH: add the ``ninja`` package's binary
    (a dependency of quanta) and this interpreter's scripts directory, for a virtual
    environment used without activating it."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja
        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in dirs if d and d not in path]
    if missing:
        os.environ["PATH"] = os.pathsep.join(missing + path)


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


__all__ = ["ENV_SWITCH", "ensure", "module", "ready", "status"]
