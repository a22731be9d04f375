"""Builds quanta's native CPU kernels at install time (the metadata lives in pyproject.toml).

    pip install torch==2.13.0 "setuptools>=68" wheel ninja
    pip install --no-build-isolation -v -e ".[test]"     # -v shows the compile's progress

The library (``quanta/kernels/_native*.so``) is compiled from the same sources with the same
flags as the just-in-time fallback (both read ``quanta/kernels/build_config.py``, loaded here by
path: the ``quanta`` package itself imports torch-heavy modules) and carries the build key that
the runtime checks before loading it. Where torch cannot be imported at build time (pip's build
isolation, which would otherwise download another torch), or no compiler works, the package
installs without it and the kernels are built on first use instead (a note says so).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_quanta_build_config", HERE / "quanta" / "kernels" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _note(message: str) -> None:
    print(f"quanta setup: {message}", file=sys.stderr, flush=True)


def _native_extension() -> tuple[list, dict]:
    if os.environ.get("QUANTA_NATIVE", "").strip().lower() in ("0", "off", "false", "no"):
        _note("QUANTA_NATIVE=0: native CPU kernels not built")
        return [], {}
    if platform.system() != "Linux":
        _note(f"native CPU kernels are built on Linux only (this is {platform.system()})")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        _note(f"torch is not importable while building ({e}): the native CPU kernels will be built on "
              "first use instead. To build them now, install torch first and then quanta with "
              "pip's --no-build-isolation.")
        return [], {}
    cfg = _build_config()
    key = cfg.build_key(torch.__version__)
    sources = [str(p.relative_to(HERE)) for p in cfg.SOURCES]

    class BuildNative(BuildExtension):
        """torch's extension builder (ninja, parallel), saying what it does and how long it took;
        a failed compile leaves the package installed and the kernels to the just-in-time build."""

        def build_extensions(self) -> None:
            # one compile per core (ninja's default runs cores + 2: more memory, no faster)
            jobs = os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
            _note(f"compiling the native CPU kernels ({len(sources)} files, {jobs} parallel jobs; 2-5 min "
                  f"on 2 cores; key {key}) ...")
            start = time.monotonic()
            try:
                super().build_extensions()
            except Exception as e:
                _note(f"could not compile the native CPU kernels ({' '.join(str(e).split())[:300]}); quanta "
                      "installs without them and tries again on first use (`quanta doctor --build` shows why)")
                return
            _note(f"native CPU kernels compiled in {time.monotonic() - start:.0f} s")

    ext = CppExtension(cfg.AOT_MODULE, sources, extra_compile_args=cfg.compile_flags() + cfg.AOT_EXTRA_CFLAGS + [cfg.key_flag(key)],
                       extra_link_args=list(cfg.LDFLAGS), optional=True)
    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
