"""`quanta doctor`: what this environment runs, the native library, the CPU it was built for,
and for each integer op which implementations are available and which fall back.

    quanta doctor            # loads a built library (never builds)
    quanta doctor --build    # builds it first where none matches (what first use would do)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import build_config as cfg
from . import native
from .gemv_rows import gemv_isa
from .library import KernelOp


@dataclass(frozen=True)
class ImplState:
    name: str
    available: bool
    why_not: str = ""  # where not available
    limits: str = ""  # where available: what this machine keeps it from running (its guard refuses those inputs)


@dataclass(frozen=True)
class OpState:
    name: str
    impls: list[ImplState]  # in the order ``impl="auto"`` tries them; "reference" last, always available


@dataclass(frozen=True)
class DoctorReport:
    versions: dict[str, str]
    python_prefix: str
    cpu: str
    cpu_features: list[str]
    cpu_features_missing: list[str]
    native: native.NativeInfo
    compile_flags: list[str]
    native_vnni: bool | None  # int8 GEMM / convs compiled with AVX-512 VNNI (None: no library)
    native_gemv_isa: str | None = None  # the int8 GEMV's loop: "avx512_vnni", "avx2" or "none" (None: no library)
    ops: list[OpState] = field(default_factory=list)
    native_conv_isa: str | None = None  # the direct int8 conv's loops (conv_native.conv_isa; None: no library)
    threads: dict[str, Any] = field(default_factory=dict)  # torch's thread count, the cores, OpenMP's wait policy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        n = self.native
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [f"{versions} ({self.python_prefix})",
                 f"CPU: {self.cpu}; features: {' '.join(self.cpu_features) or 'none known'}"
                 + (f"; lacks: {' '.join(self.cpu_features_missing)}" if self.cpu_features_missing else ""),
                 f"native library: {n.status}"]
        if n.path:
            lines.append(f"  file: {n.path} ({n.origin})")
        if n.refused:
            lines.append(f"  refused: {n.refused}")
        lines.append(f"  build key: {n.key}; flags: {' '.join(self.compile_flags)}")
        lines.append(f"  just-in-time build folder of this environment: {n.cache_dir}")
        if self.native_vnni is not None:
            lines.append("  int8 GEMM and convs with AVX-512 VNNI: " + ("yes" if self.native_vnni else
                                                                        "no (this CPU lacks it)"))
        if self.native_gemv_isa is not None:
            lines.append("  int8 GEMV (a few rows, the recurrent time loop): " + {
                "avx512_vnni": "AVX-512 VNNI", "avx2": "AVX2 (exact vpmaddwd on int16-widened codes)"}.get(
                    self.native_gemv_isa, "no (a plain loop: not offered)"))
        if self.native_conv_isa is not None:
            lines.append(f"  int8 conv native loops: {self.native_conv_isa}" + (
                " (dense and depthwise; weights within ±64, e.g. weight_bits=7)" if self.native_conv_isa == "avx2" else ""))
        if self.threads:
            lines.append(threads_line(self.threads))
        lines.append("kernel ops (implementations in the order impl='auto' tries them; a missing one falls back "
                     "to the next):")
        width = max((len(op.name) for op in self.ops), default=0)
        for op in self.ops:
            parts = [(f"{i.name} ({i.limits})" if i.limits else i.name) if i.available else f"{i.name} (no: {i.why_not})"
                     for i in op.impls]
            lines.append(f"  {op.name:<{width}}  " + ", ".join(parts))
        return "\n".join(lines)


def kernel_ops() -> list[KernelOp]:
    """Every `KernelOp` defined in ``quanta.kernels`` (its modules imported)."""
    import quanta.kernels as pkg

    found: dict[int, KernelOp] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        for value in vars(module).values():
            if isinstance(value, KernelOp):
                found.setdefault(id(value), value)
    return sorted(found.values(), key=lambda op: op.name)


#: native implementations whose guards refuse every input where the library lacks AVX-512 VNNI
#: (available() says only that the library is loaded)
_NEED_VNNI = {"gemm_native"}
#: ... and those that need the native gemv's fast loop (AVX-512 VNNI or AVX2: `gemv_rows.gemv_isa`)
_NEED_GEMV = {"gemv_native"}


def _why_not(impl: Any, vnni: bool | None) -> str:
    limits = impl.limits() if impl.limits is not None and "cpu" in impl.devices else None
    if limits:
        return limits
    if "cpu" not in impl.devices:
        return f"{'/'.join(impl.devices)} only" + ("" if torch.cuda.is_available() else ", no GPU here")
    if "native" in impl.name and not native.ready():
        return "native library not loaded"
    if impl.name in _NEED_GEMV:
        return "needs AVX-512 VNNI or AVX2, which this build lacks"
    if "native" in impl.name and not vnni:
        return "needs AVX-512 VNNI, which this CPU lacks"
    return "not supported by this torch or CPU"


def _op_state(op: KernelOp, vnni: bool | None) -> OpState:
    impls = []
    for impl in op.impls:
        available = ("cpu" in impl.devices and impl.is_available() and not (impl.name in _NEED_VNNI and not vnni)
                     and not (impl.name in _NEED_GEMV and gemv_isa() == "none"))
        limits = (impl.limits() or "") if available and impl.limits is not None else ""
        impls.append(ImplState(impl.name, available, "" if available else _why_not(impl, vnni), limits))
    return OpState(op.name, impls + [ImplState("reference", True)])


def thread_facts() -> dict[str, Any]:
    """torch's intra-op thread count, the cores this process may run on, and OpenMP's wait policy
    (``OMP_WAIT_POLICY`` as set when the process started; None: unset)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"torch_threads": torch.get_num_threads(), "cores": cores,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def threads_line(facts: dict[str, Any]) -> str:
    policy = facts.get("omp_wait_policy")
    line = f"threads: {facts.get('torch_threads')} (torch.get_num_threads) on {facts.get('cores')} core(s); "
    if policy is None:
        return line + ("OMP_WAIT_POLICY unset: a thread that finishes its share spins before it sleeps, which "
                       "starves a lagging thread where other processes share the cores (start such runs with "
                       "OMP_WAIT_POLICY=PASSIVE, or use quanta.fit_threads)")
    return line + f"OMP_WAIT_POLICY={policy}"


def diagnose(build: bool = False) -> DoctorReport:
    """The report; ``build=True`` builds the native library first where none matches."""
    native.ensure(build=build)
    from .._version import __version__

    have = set(cfg.cpu_features())
    arm = platform.machine().startswith(("aarch64", "arm"))
    relevant = [f for f in cfg.CPU_FEATURES if (f in ("asimd", "asimddp", "sve")) == arm]
    vnni, isa = None, None
    if native.ready():
        vnni, isa = bool(native.module().gemv_has_vnni()), gemv_isa()
    versions = {"quanta": __version__, "torch": torch.__version__,
                "Python": platform.python_version()}
    return DoctorReport(versions=versions, python_prefix=sys.prefix, cpu=f"{cfg.cpu_model()} ({platform.machine()})",
                        cpu_features=[f for f in relevant if f in have],
                        cpu_features_missing=[f for f in relevant if f not in have], native=native.info(),
                        compile_flags=cfg.compile_flags(), native_vnni=vnni, native_gemv_isa=isa,
                        ops=[_op_state(op, vnni) for op in kernel_ops()],
                        native_conv_isa=str(native.module().conv_isa()) if native.ready() else None,
                        threads=thread_facts())


__all__ = ["DoctorReport", "ImplState", "OpState", "diagnose", "kernel_ops"]
