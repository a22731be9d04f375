"""`quanta supported`: which float modules each preset quantizes, into which integer module, and
which kernel ops run them, found by running the real pipeline (not written by hand).

For every float class in the module registry (`quanta.nn.registry`) and every preset
(`quanta.transforms.PRESETS`), a small instance inside a host model is quantized with
`quanta.quantize` (speed check off) and the conversion report says what it became: an integer
module, ``simulated`` (fake-quantized float) or ``float``. Each integer module is then run once
with its kernels forced to their reference (``impl="reference"``, the same on every machine)
while the `quanta.kernels` ops it calls are recorded; the kernel table lists each op with its
implementations in the order ``impl="auto"`` tries them (which of them runs on a machine:
`quanta doctor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..integer import IntegerModule
from ..kernels.doctor import kernel_ops
from ..nn.modules.functional import Add
from ..nn.registry import BY_PATH, registered_types
from ..transforms import PRESETS, conversion_report, preset, quantize
from ..transforms.presets import quantizes_any


class _Host(nn.Module):
    """A model holding one layer ``layer``, called by ``call(layer, x)`` on a tensor input."""

    def __init__(self, layer: nn.Module, call: Callable[[nn.Module, torch.Tensor], Any]) -> None:
        super().__init__()
        self.layer = layer
        self.call = call

    def forward(self, x: torch.Tensor) -> Any:
        out = self.call(self.layer, x)
        return out[0] if isinstance(out, tuple) else out


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


#: float class → (a small instance, an input shape, how the host calls it); every registered
#: class needs one (a test checks), so that a new registration shows up in the table
EXAMPLES: dict[type, tuple[Callable[[], nn.Module], tuple[int, ...], Callable[[nn.Module, torch.Tensor], Any]]] = {
    nn.Linear: (lambda: nn.Linear(256, 256), (4, 256), lambda m, x: m(x)),
    nn.Conv1d: (lambda: nn.Conv1d(8, 16, 3), (2, 8, 16), lambda m, x: m(x)),
    nn.Conv2d: (lambda: nn.Conv2d(8, 16, 3), (2, 8, 8, 8), lambda m, x: m(x)),
    nn.Conv3d: (lambda: nn.Conv3d(8, 16, 3), (2, 8, 5, 5, 5), lambda m, x: m(x)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(8, 16, 3), (2, 8, 16), lambda m, x: m(x)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(8, 16, 3), (2, 8, 8, 8), lambda m, x: m(x)),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(8, 16, 3), (2, 8, 5, 5, 5), lambda m, x: m(x)),
    nn.Embedding: (lambda: nn.Embedding(64, 256), (4, 8), lambda m, x: m((x.abs() * 10).long() % 64)),
    nn.AvgPool1d: (lambda: nn.AvgPool1d(2), (2, 8, 16), lambda m, x: m(x)),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(2), (2, 8, 8, 8), lambda m, x: m(x)),
    nn.AvgPool3d: (lambda: nn.AvgPool3d(2), (2, 8, 4, 4, 4), lambda m, x: m(x)),
    nn.AdaptiveAvgPool1d: (lambda: nn.AdaptiveAvgPool1d(1), (2, 8, 16), lambda m, x: m(x)),
    nn.AdaptiveAvgPool2d: (lambda: nn.AdaptiveAvgPool2d(1), (2, 8, 8, 8), lambda m, x: m(x)),
    nn.AdaptiveAvgPool3d: (lambda: nn.AdaptiveAvgPool3d(1), (2, 8, 4, 4, 4), lambda m, x: m(x)),
    nn.LSTM: (lambda: nn.LSTM(32, 32, batch_first=True), (2, 5, 32), lambda m, x: _first(m(x))),
    nn.LSTMCell: (lambda: nn.LSTMCell(32, 32), (2, 32), lambda m, x: _first(m(x))),
    nn.GRU: (lambda: nn.GRU(32, 32, batch_first=True), (2, 5, 32), lambda m, x: _first(m(x))),
    nn.GRUCell: (lambda: nn.GRUCell(32, 32), (2, 32), lambda m, x: m(x)),
    nn.RNN: (lambda: nn.RNN(32, 32, batch_first=True), (2, 5, 32), lambda m, x: _first(m(x))),
    nn.RNNCell: (lambda: nn.RNNCell(32, 32), (2, 32), lambda m, x: m(x)),
    nn.MultiheadAttention: (lambda: nn.MultiheadAttention(64, 4, batch_first=True), (2, 5, 64),
                            lambda m, x: _first(m(x, x, x, need_weights=False))),
    nn.TransformerEncoderLayer: (lambda: nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True),
                                 (2, 5, 64), lambda m, x: m(x)),
    Add: (lambda: Add(), (2, 8, 4, 4), lambda m, x: m(x, x * 0.5)),
}


@dataclasses.dataclass(frozen=True)
class Support:
    """``module`` quantized by ``method``: what it became (``results``: integer class names, or
    ``simulated`` / ``float``, one per layer the report lists) and the kernel ops they ran."""

    module: str
    method: str
    results: tuple[str, ...]
    ops: tuple[str, ...]


@contextlib.contextmanager
def _recording_ops() -> Iterator[list[str]]:
    """Record the names of the `quanta.kernels` ops called inside (each op's reference is
    wrapped for the duration, and restored after)."""
    called: list[str] = []
    ops = kernel_ops()
    originals = [op.reference for op in ops]

    def wrap(op: Any, reference: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any) -> Any:
            called.append(op.name)
            return reference(*args)
        return recorded

    try:
        for op, reference in zip(ops, originals):
            op.reference = wrap(op, reference)
        yield called
    finally:
        for op, reference in zip(ops, originals):
            op.reference = reference


def _ops_run(model: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    integer = [m for m in model.modules() if isinstance(m, IntegerModule)]
    saved = [m.impl for m in integer]
    try:
        for m in integer:
            m.impl = "reference"
            m.pack()
        with _recording_ops() as called, torch.no_grad():
            model(x)
    finally:
        for m, impl in zip(integer, saved):
            m.impl = impl
            m.pack()
    return tuple(dict.fromkeys(called))


def probe(float_cls: type, method: str) -> Support:
    """Quantize the example of ``float_cls`` with preset ``method``; what it became."""
    make, shape, call = EXAMPLES[float_cls]
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        host = _Host(make(), call).eval()
    data = [torch.randn(shape, generator=g) for _ in range(2)]
    if not quantizes_any(host, preset(method)):
        return Support(float_cls.__name__, method, ("float",), ())
    try:
        q = quantize(host, method, data, progress=False, speed_check=False)
    except ValueError as e:  # prepare left it float (a shape the preset's formats cannot take)
        if "has no quantized modules" not in str(e):
            raise
        return Support(float_cls.__name__, method, ("float",), ())
    results = tuple(r.result for r in conversion_report(q)) or ("float",)
    return Support(float_cls.__name__, method, results, _ops_run(q, data[0]))


def support_matrix() -> list[Support]:
    """Every registered float class (except those named by import path) × every preset."""
    missing = [c.__name__ for c in registered_types() if c not in EXAMPLES and _path(c) not in BY_PATH]
    if missing:
        raise ValueError(f"no example instance for registered module types {missing}: add them to "
                         "quanta.commands.supported.EXAMPLES")
    return [probe(cls, method) for cls in EXAMPLES for method in sorted(PRESETS)]


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _cell(s: Support) -> str:
    kinds = list(dict.fromkeys(s.results))
    return " + ".join(f"`{k}`" if k not in ("simulated", "float") else k for k in kinds)


def markdown(matrix: list[Support] | None = None) -> str:
    """The two Markdown tables: float module × preset → what it becomes; integer module → kernel ops."""
    matrix = support_matrix() if matrix is None else matrix
    methods = sorted(PRESETS)
    modules = list(dict.fromkeys(s.module for s in matrix))
    cells = {(s.module, s.method): _cell(s) for s in matrix}
    lines = ["| float module | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    lines += [f"| `{mod}` | " + " | ".join(cells[(mod, m)] for m in methods) + " |" for mod in modules]
    impls = {op.name: [i.name for i in op.impls] + ["reference"] for op in kernel_ops()}
    runs: dict[str, list[str]] = {}
    for s in matrix:
        integer = [r for r in dict.fromkeys(s.results) if r not in ("simulated", "float")]
        for r in integer:
            runs.setdefault(r, [])
            runs[r] += [o for o in s.ops if o not in runs[r]] if len(integer) == 1 else []
    lines += ["", "| integer module | kernel ops (implementations in the order `impl=\"auto\"` tries them) |",
              "| --- | --- |"]
    for name in sorted(runs):
        ops = "; ".join(f"`{o}`: {' / '.join(impls.get(o, []))}" for o in runs[name]) or "none (its own torch ops)"
        lines.append(f"| `{name}` | {ops} |")
    by_path = ", ".join(f"`{p}`" for p in sorted(BY_PATH))
    lines += ["", f"Also quantized, by import path (never imported by quanta): {by_path}.",
              "simulated: fake-quantized float (no integer module for it); float: the preset leaves it float."]
    return "\n".join(lines)


#: the lines around the generated tables in the README
MARKERS = ("<!-- supported:start -->", "<!-- supported:end -->")


def text(matrix: list[Support] | None = None, *, as_markdown: bool = False) -> str:
    """`quanta supported`: one line per float module (what each preset makes of it, presets that
    leave it float omitted); with ``as_markdown``, the README's section (markers included)."""
    matrix = support_matrix() if matrix is None else matrix
    if as_markdown:
        return "\n".join([MARKERS[0], markdown(matrix), MARKERS[1]])
    modules = list(dict.fromkeys(s.module for s in matrix))
    width = max(len(m) for m in modules)
    lines = []
    for mod in modules:
        cells = [f"{s.method}: {_cell(s).replace('`', '')}" for s in matrix if s.module == mod and s.results != ("float",)]
        lines.append(f"{mod:<{width}}  {', '.join(cells) or 'float under every preset'}")
    return "\n".join(lines)
