"""How every integer op is defined: once with ``torch.library``, a readable reference
implementation, and fast implementations chosen by explicit guards.

An op is called with an ``impl`` argument: ``"auto"`` picks the first fast implementation
whose guards accept the inputs (else the reference), ``"reference"`` forces the reference,
and a named implementation is used if its guards accept the inputs or raises saying why not.
Falling back to the reference because a guard refused is logged once per reason. Integer
modules call ops through their `quanta.kernels.binding.Binding`, which asks `KernelOp.choose`
once per input key, holds the settled calls and counts which implementation ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

LOG = logging.getLogger("quanta.kernels")

#: the ``quanta`` op namespace (``torch.ops.quanta.<name>``)
LIB = torch.library.Library("quanta", "DEF")

Guard = Callable[..., "str | None"]  # returns why the inputs are not supported, or None


@dataclass
class Impl:
    """A fast implementation: ``available()`` checks the machine (built once), ``guard(*args)``
    checks the inputs (per call) and returns a reason string when they are not supported."""

    name: str
    fn: Callable[..., torch.Tensor]
    guard: Guard
    available: Callable[[], bool] = lambda: True
    devices: tuple[str, ...] = ("cpu",)
    #: ``fn`` without its argument validation, for callers whose arguments passed ``guard`` and
    #: are built consistently (integer modules); ``None``: ``fn`` itself
    unchecked: Callable[..., torch.Tensor] | None = None
    #: ``False``: a compiled library that torch.compile cannot trace into; never chosen while
    #: compiling, and ``available()`` (cheap) is asked at every call because it can turn true
    #: later in the process (the native library is built on first use)
    traceable: bool = True
    #: a non-traceable implementation that needs nothing an eager call settles (it derives all
    #: it needs from the op's arguments at every call): an opaque op (``KernelOp.traceable``
    #: False) in a compiled graph may name it (once an eager call has found it available) and
    #: runs it when the graph runs, instead of a traceable one chosen while tracing
    graph_safe: bool = False
    #: ``prefer(*args)``: why another implementation is faster for these (guard-accepted)
    #: inputs, or None. ``impl="auto"`` then tries the next implementations and comes back to
    #: this one only if none of them accepts; a named call ignores it.
    prefer: Guard | None = None
    #: ``limits()``: what this machine keeps the implementation from computing exactly (e.g. u8×s8
    #: pair sums that saturate without VNNI, `quanta.kernels.u8s8_saturation`), or None. Where
    #: ``available()`` is False it says why (`quanta doctor`, a forced call); where True, ``guard``
    #: refuses the inputs it names
    limits: Callable[[], str | None] | None = None
    #: ``available()`` is a cheap lookup that torch.compile may trace (it becomes a guard, e.g.
    #: `native.ready`): asked while tracing too, so a graph compiled before any eager call can name
    #: this (graph_safe) implementation
    available_while_tracing: bool = False
    _available: bool | None = field(default=None, repr=False)

    def is_available(self) -> bool:
        """``available()``, asked once for traceable implementations (the machine does not
        change; and under torch.compile a call into ``torch.backends`` would break the graph at
        every integer module)."""
        if not self.traceable:
            if torch.compiler.is_compiling() and not self.available_while_tracing:
                return self.graph_safe and bool(self._available)  # (what an eager call found)
            self._available = bool(self.available())
            return self._available
        if self._available is None:
            self._available = bool(self.available())
        return self._available


@dataclass
class KernelOp:
    name: str
    schema: str  # without the name, e.g. "(Tensor x, ..., str impl) -> Tensor"
    reference: Callable[..., torch.Tensor]
    impls: list[Impl] = field(default_factory=list)
    fake: Callable[..., Any] | None = None  # output shapes/dtypes from the inputs (no ``impl``)
    #: under torch.compile, trace into the implementation (its elementwise ops fuse with their
    #: neighbours) instead of calling the opaque ``quanta::<name>`` op
    traceable: bool = False
    _logged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._by_name = {i.name: i for i in self.impls}
        if not torch.cuda.is_available():  # CPU-only: settle availability now, outside any tracing
            for impl in self.impls:
                if impl.traceable:
                    impl.is_available()
        LIB.define(self.name + self.schema)
        # MkldnnCPU: a prepacked oneDNN weight is an mkldnn tensor, which routes the call there
        for device in ("CPU", "CUDA", "MkldnnCPU"):
            LIB.impl(self.name, self._dispatch, device)
        if self.fake is not None:
            fake = self.fake  # shapes only: it takes the op's inputs without ``impl``
            torch.library.register_fake(f"quanta::{self.name}", lambda *args: fake(*args[:-1]), lib=LIB)

    @property
    def op(self) -> Any:
        return getattr(torch.ops.quanta, self.name)

    def available_impls(self) -> list[str]:
        return [i.name for i in self.impls if i.is_available()] + ["reference"]

    def why_not_available(self, impl: str) -> str | None:
        """None where ``impl`` is available on this machine, else why not (its ``limits()`` where it
        has them)."""
        cand = self._by_name[impl] if impl != "reference" else None
        if cand is None or cand.is_available():
            return None
        why = cand.limits() if cand.limits is not None else None
        return why or "its library or CPU support is missing"

    def choose(self, *args: Any) -> str:
        """The implementation ``impl="auto"`` runs for these inputs."""
        device = _device_of(args)
        slower = None  # the first implementation that accepts the inputs but prefers another
        for impl in self.impls:
            if device not in impl.devices or not impl.is_available():
                continue
            reason = impl.guard(*args)
            if reason is None:
                if impl.prefer is None or impl.prefer(*args) is None:
                    return impl.name
                slower = slower or impl.name
                continue
            self._log_once(f"{impl.name}: {reason}")
        return slower or "reference"

    def _log_once(self, message: str) -> None:
        if torch.compiler.is_compiling():  # (logged by the eager calls; logging breaks graphs)
            return
        if message not in self._logged:
            self._logged.add(message)
            LOG.info("quanta::%s falls back from %s", self.name, message)

    def _dispatch(self, *args: Any) -> torch.Tensor:
        *inputs, impl = args
        if impl == "auto":
            impl = self.choose(*inputs)
        if impl == "reference":
            return self.reference(*inputs)
        for cand in self.impls:
            if cand.name == impl:
                if not cand.is_available():
                    raise RuntimeError(f"quanta::{self.name}: implementation {impl!r} is not available on "
                                       f"this machine: {self.why_not_available(impl)}")
                reason = cand.guard(*inputs)
                if reason is not None:
                    raise ValueError(f"quanta::{self.name}: implementation {impl!r} cannot run these inputs: {reason}")
                return cand.fn(*inputs)
        raise ValueError(f"quanta::{self.name}: unknown implementation {impl!r}; "
                         f"choose 'auto', 'reference' or one of {[i.name for i in self.impls]}")

    def __call__(self, *args: Any, impl: str = "auto", checked: bool = False) -> torch.Tensor:
        """Run the op. In eager mode the Python implementation is called directly (the torch
        dispatcher's boxing costs ~10-30 µs a call, much of a small layer's time); under
        ``torch.compile`` / export the registered op is called, so graphs see ``quanta::<name>``.
        ``checked=True``: ``impl`` is what `choose` just returned for these arguments, so its
        guard is not run a second time and its ``unchecked`` form runs. In quanta's kernels,
        *checked* always means this: arguments already validated by the implementation's guard
        (a function that validates before running is *validating*, as `conv.validating`)."""
        if torch.compiler.is_compiling():
            chosen = self._by_name.get(impl)
            if chosen is not None and not chosen.traceable and not (chosen.graph_safe and not self.traceable):
                # an eager choice of a compiled library (a module's cached choice): choose among the
                # traceable ones now, so that the graph names one (an opaque op given the eager
                # choice would run it with none of the eager call's settled state, e.g. re-planned
                # at every call)
                impl = self.choose(*args)
            if self.traceable:  # let the compiler see (and fuse) the implementation's own ops
                return self._dispatch(*args, impl)
            return self.op(*args, impl)
        if checked and impl != "reference":
            chosen = self._by_name[impl]
            return (chosen.unchecked or chosen.fn)(*args)
        return self._dispatch(*args, impl)


def _device_of(args: tuple[Any, ...]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"
