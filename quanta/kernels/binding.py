"""The one binding step between an integer module and its kernels: choose once per input
signature, hold what was settled, serve eager and compiled calls, count what ran.

A module holds one `Binding` (``IntegerModule.binding``). Its first, guarded call of a
`quanta.kernels.library.KernelOp` goes through `Binding.run` (or `Binding.choose` +
`Binding.record`): the op's guards choose an implementation, remembered per *key* (what the
module says the guards read that can change between calls: dtype, device, layout, row bucket).
Where a call can be settled further (every weight-side argument resolved once, a callable that
takes only the activations), the module hands it to `Binding.settle` with the arguments a
compiled graph needs to run the same kernels; later eager calls are then one dict lookup
(``binding.calls.get(signature)``) and the kernel. The module replaces its binding whenever its
packed form goes stale (`quanta.integer.base.IntegerModule.pack`): nothing settled outlives the
weights, device, implementation preference or fused activation it was settled for.

Compiled graphs run what eager settled: a module hands `settle` either the arguments of a native
graph operator (``compiled``: ``quanta_native::conv_packed`` / ``linear_packed``) or, where no
such operator exists, a ``fake`` stating the call's output; then the call itself is filed for
graphs (`quanta.kernels.graph_ops.register_settled_call`: the graph node runs this callable) and
released with the binding.

Example (an integer Linear's forward)::

    settled = self.binding.calls.get(sig)            # the fast path: one lookup, the kernel
    if settled is not None:
        self.kernel_counts[settled[0]] += 1          # (the binding's counts)
        return settled[1](x2)
    impl, checked = self.binding.choose(int8_linear, key, *args, preferred=self.impl)
    y = int8_linear(*args, impl=self.binding.record(impl), checked=checked)
    if impl in NATIVE_LINEAR_IMPLS and checked:      # settle: later calls take the fast path
        self.binding.settle(sig, impl, native_linear_call(...), compiled_linear_args(...))
    # (or, with nothing to settle: y = self.binding.run(op, key, *args, preferred=self.impl))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .graph_ops import SettledGraphCall, register_settled_call, release_settled_calls
from .library import KernelOp

#: a settled eager call: (implementation name, callable taking the per-call inputs)
Settled = tuple[str, Callable[..., Any]]


class Binding:
    """One module's settled kernel choices and calls (see the module docstring).

    ``choices``: the guards' choice per ``(op name, key)``; ``calls``: settled eager calls per
    input signature; ``compiled``: per input signature, what a compiled graph calls instead
    (arguments of a graph operator, module-defined); ``counts``: calls per implementation (the
    module's ``kernel_counts``, shared)."""

    __slots__ = ("_graph_handles", "calls", "choices", "compiled", "counts", "limit")

    def __init__(self, counts: Counter[str] | None = None, limit: int | None = None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"Binding: limit must be a positive int or None, got {limit!r}")
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.choices: dict[tuple[str, Hashable], str] = {}
        self.calls: dict[Hashable, Settled] = {}
        self.compiled: dict[Hashable, Any] = {}
        #: at most this many settled signatures (memory stays bounded under ever-new shapes)
        self.limit = limit
        self._graph_handles: list[int] = []  # calls filed for graphs (graph_ops), released with this binding

    def __del__(self) -> None:
        handles = getattr(self, "_graph_handles", None)
        if handles:
            release_settled_calls(handles)

    def choose(self, op: KernelOp, key: Hashable, *args: Any, preferred: str = "auto") -> tuple[str, bool]:
        """``(implementation, chosen_by_guards)`` for ``op(*args)``: ``preferred`` itself unless it
        is ``"auto"``, else the guards' choice, remembered per ``key`` (not while torch.compile
        traces: a graph must not mutate its module)."""
        if preferred != "auto":
            return preferred, False
        impl = self.choices.get((op.name, key))
        if impl is None:
            impl = op.choose(*args)
            if not torch.compiler.is_compiling():
                self.choices[(op.name, key)] = impl
        return impl, True

    def record(self, impl: str) -> str:
        """Count one call of ``impl`` (not while torch.compile traces, which would recompile at
        every call) and return it."""
        if not torch.compiler.is_compiling():
            self.counts[impl] += 1
        return impl

    def run(self, op: KernelOp, key: Hashable, *args: Any, preferred: str = "auto") -> Any:
        """`choose`, `record` and run ``op(*args)`` (its guards skipped where they chose)."""
        impl, checked = self.choose(op, key, *args, preferred=preferred)
        return op(*args, impl=self.record(impl), checked=checked)

    def settle(self, signature: Hashable, impl: str, call: Callable[..., Any], compiled: Any = None,
               fake: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Remember ``call`` (which ran ``impl``) for eager calls of ``signature`` and, for compiled
        graphs of it, ``compiled`` (a graph operator's arguments) or, given instead a ``fake``
        (``call``'s output as an empty tensor), ``call`` itself as a `SettledGraphCall`. Not while
        tracing; not past ``limit``. True if kept."""
        if torch.compiler.is_compiling() or (self.limit is not None and len(self.calls) >= self.limit):
            return False
        self.calls[signature] = (impl, call)
        if compiled is None and fake is not None:
            compiled = register_settled_call(call, fake)
            self._graph_handles.append(compiled.handle)
        if compiled is not None:
            self.compiled[signature] = compiled
        return True

    def graph_call(self, key: Hashable, make: Callable[[], tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                 Callable[[torch.Tensor], torch.Tensor]]]
                   ) -> SettledGraphCall | None:
        """The graph call filed under ``key`` in ``compiled``: an eager step a graph should run as
        it is (e.g. a pad that inductor would re-express ~10x slower). Eagerly, the first request
        files ``make()``'s ``(call, fake)``; while tracing, only what eager calls filed (else None)."""
        filed = self.compiled.get(key)
        if filed is None and not torch.compiler.is_compiling():
            filed = self.compiled[key] = register_settled_call(*make())
            self._graph_handles.append(filed.handle)
        return filed

    def __repr__(self) -> str:
        return (f"Binding(choices={len(self.choices)}, calls={sorted(i for i, _ in self.calls.values())}, "
                f"compiled={len(self.compiled)})")


__all__ = ["Binding", "Settled", "SettledGraphCall"]
