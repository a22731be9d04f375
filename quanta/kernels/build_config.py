"""What quanta's native CPU library is built from, and the key that names one build.

Standard library only: ``setup.py`` loads this file by path at install time (before the
``quanta`` package, which imports torch-heavy modules, can be imported), and the runtime
(`quanta.kernels.native`) imports it; so the ahead-of-time build and the just-in-time build
compile the same sources with the same flags.

The **build key** hashes the sources and headers, the compiler flags, the torch version, the
Python version and the CPU (``-march=native`` code runs only on the CPU it was built for). It is
compiled into the library (``csrc/build_info.cpp``: the bytes ``quanta-build-key:k<key>``) and
read back from the file *without loading it*: a library whose key differs from the one computed
from the installed sources is refused (loading it would register its operators for good), so an
editable checkout whose C++ changed never runs old code.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
#: compiled together into one library (fused.cpp holds the Python bindings); build_info.cpp holds the key
SOURCES = [CSRC / name for name in ("fused.cpp", "gemv.cpp", "recurrent.cpp", "conv.cpp", "conv_dense.cpp",
                                    "conv_pointwise.cpp", "conv_depthwise.cpp", "linear_op.cpp", "linear_avx2.cpp",
                                    "attention.cpp", "build_info.cpp")]
HEADERS = [CSRC / name for name in ("common.h", "conv_kernels.h", "simd.h", "activation.h", "post_op.h", "tile_u8s8.h")]
#: no -ffast-math, no FMA contraction: the kernels must round exactly like the PyTorch ops
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
#: setup.py only: Python's own build flags (which setuptools adds) hold ``-g``; debug information
#: doubles the compile's memory and the library's size and changes no code (so not in the key)
AOT_EXTRA_CFLAGS = ["-g0"]
#: the ahead-of-time library's module name: ``quanta/kernels/_native<abi suffix>``
AOT_MODULE = "quanta.kernels._native"
KEY_DEFINE = "QUANTA_BUILD_KEY"
KEY_MARKER = b"quanta-build-key:"
#: CPU features that decide which kernels a ``-march=native`` build holds (`quanta doctor` lists them)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "amx_bf16", "asimd", "asimddp", "sve")


def march() -> list[str]:
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else []


def compile_flags() -> list[str]:
    """The C++ flags of both builds, without the key's ``-D`` (`key_flag`)."""
    return CFLAGS + march()


def _cpuinfo_lines() -> list[str]:
    """``/proc/cpuinfo``'s distinct model name and feature lines (empty where unreadable)."""
    lines: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")) and line not in lines:
                lines.append(line)
    except OSError:
        pass
    return lines


def cpu_fingerprint() -> str:
    """What ``-march=native`` compiles for: a build is used only on the same kind of CPU."""
    return platform.machine() + "".join(_cpuinfo_lines())


def cpu_model() -> str:
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The `CPU_FEATURES` this machine has."""
    have = {f for line in _cpuinfo_lines() if not line.startswith("model name") for f in line.split(":", 1)[-1].split()}
    return [f for f in CPU_FEATURES if f in have]


def build_key(torch_version: str) -> str:
    """16 hex digits naming a build of these sources with these flags, for this torch, Python and CPU."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(compile_flags() + LDFLAGS).encode() + b"\0" + torch_version.encode() + b"\0")
    h.update(f"{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}".encode() + b"\0")
    h.update(cpu_fingerprint().encode())
    return h.hexdigest()[:16]


def key_flag(key: str) -> str:
    """The ``-D`` that compiles ``key`` into the library (an identifier: no shell quoting needed)."""
    return f"-D{KEY_DEFINE}=k{key}"


def embedded_key(path: str | Path) -> str | None:
    """The key compiled into the library at ``path`` (read from its bytes, not loaded), or None."""
    data = Path(path).read_bytes()
    found = re.search(re.escape(KEY_MARKER) + rb"k([0-9a-f]{16})\0", data)
    return found.group(1).decode() if found else None


def missing_sources() -> list[str]:
    return [p.name for p in SOURCES + HEADERS if not p.exists()]
