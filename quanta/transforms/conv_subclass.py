"""Which user conv subclasses quanta can lower: "constant zero padding, then the conv op".

Models ported from TensorFlow (and timm's static ``Conv2dSame``) write convolutions as
``nn.Conv2d`` subclasses whose ``forward`` pads first::

    class Conv2dSame(nn.Conv2d):            # forward traced by torch.fx (this module alone):
        def forward(self, x):               #   x -> F.pad(x, [0, 1, 0, 1]) | self.pad(x)
            x = self.pad(x)                 #     -> conv2d(_, self.weight, self.bias,
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

`analyse_conv_subclass` traces the module's own ``forward`` with ``torch.fx`` (never looks at
names) and accepts exactly a chain of constant zero pads (``nn.ZeroPad*d``, ``nn.ConstantPad*d``
with value 0, ``F.pad(..., mode="constant", value=0)`` with constant non-negative amounts, any
number, asymmetric allowed) followed by ``F.conv{1,2,3}d`` on the module's own ``weight`` /
``bias`` / ``stride`` / ``dilation`` / ``groups`` (its padding argument may pad too, ``"same"``
included), whose result is returned as it is. Then the module computes what a plain conv with
the summed padding computes, and `PadThenConv` says how: the symmetric part goes into the
conv's own padding, the rest (``extra``, in ``F.pad`` order: last dimension first) is padded
onto the input before it. Anything else — extra ops, padding computed from the input's shape,
a weight transformed on the way (weight standardization, a learned scale), another padding
mode — returns the reason as a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_CONVS = {nn.Conv1d: (1, torch.conv1d), nn.Conv2d: (2, torch.conv2d), nn.Conv3d: (3, torch.conv3d)}
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass(frozen=True)
class PadThenConv:
    """What a lowerable subclass computes: ``conv(F.pad(x, extra), padding=conv_padding)`` with
    the module's weight, bias, stride, dilation and groups; ``extra`` in ``F.pad`` order
    (``(left, right, top, bottom)`` for 2-d), all zeros when the padding is symmetric."""

    conv_padding: tuple[int, ...]
    extra: tuple[int, ...]

    @property
    def symmetric(self) -> bool:
        return not any(self.extra)


def _conv_kind(module: nn.Module) -> tuple[int, Any] | None:
    for cls, kind in _CONVS.items():
        if isinstance(module, cls):
            return kind
    return None


def _float_view(module: nn.Module) -> nn.Module:
    """The user's float module (a quantized wrapper's float twin, sharing its weights)."""
    to_float = getattr(module, "to_float", None)
    return to_float() if callable(to_float) and hasattr(module, "quantizers") else module


def _ints(value: Any, n: int, what: str) -> tuple[int, ...] | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) in (1, n) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value) * (n // len(value))
    return f"its {what} argument {value!r} is not a constant"


def _pad_amounts(node: fx.Node, mods: dict[str, nn.Module], n: int) -> tuple[int, ...] | str:
    """Per-side amounts (``F.pad`` order, ``2n`` entries) of one constant zero-padding node."""
    if node.op == "call_module" and isinstance(mods.get(node.target), _PAD_MODULES):
        pad = mods[node.target]
        if getattr(pad, "value", 0.0) != 0.0:
            return f"{type(pad).__name__} pads with {pad.value}, not zero"
        amounts: Any = pad.padding
    elif node.op == "call_function" and node.target in (F.pad, torch._C._nn.pad):
        args = dict(zip(("input", "pad", "mode", "value"), node.args)) | dict(node.kwargs)
        if args.get("mode", "constant") != "constant":
            return f"it pads with mode={args['mode']!r}, not constant zeros"
        if args.get("value") not in (None, 0, 0.0):
            return f"it pads with value {args['value']!r}, not zero"
        amounts = args.get("pad")
    else:
        return f"its forward runs {_describe(node)} before the convolution"
    if not isinstance(amounts, (tuple, list)) or not all(isinstance(a, int) and not isinstance(a, bool)
                                                         for a in amounts):
        return f"its padding {amounts!r} is computed from the input (not a constant)"
    if len(amounts) > 2 * n:
        return f"it pads {len(amounts) // 2} dimensions of a {n}-d convolution's input"
    if any(a < 0 for a in amounts):
        return f"it crops (negative padding {tuple(amounts)})"
    return tuple(amounts) + (0,) * (2 * n - len(amounts))


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r}"


def _conv_padding(value: Any, module: nn.Module, n: int) -> tuple[int, ...] | str:
    """The conv call's own padding in ``F.pad`` order (last dimension first, before/after)."""
    if value == "valid":
        return (0,) * (2 * n)
    if value == "same":
        pairs = []
        for d, k in zip(module.dilation, module.kernel_size):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))  # torch pads the extra one after
        return tuple(a for pair in reversed(pairs) for a in pair)
    sym = _ints(value, n, "padding")
    return sym if isinstance(sym, str) else tuple(p for s in reversed(sym) for p in (s, s))


def analyse_conv_subclass(module: nn.Module) -> PadThenConv | str:
    """`PadThenConv` when ``module`` (a conv subclass, or its quantized wrapper) provably
    computes constant zero padding followed by its own convolution; else why not (one line)."""
    kind = _conv_kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a Conv1d/Conv2d/Conv3d"
    n, conv_fn = kind
    float_module = _float_view(module)
    try:
        graph = fx.Tracer().trace(float_module)
    except Exception as e:
        return f"torch.fx cannot trace its forward ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    mods = dict(float_module.named_modules())
    nodes = list(graph.nodes)
    placeholders = [nd for nd in nodes if nd.op == "placeholder"]
    outputs = [nd for nd in nodes if nd.op == "output"]
    if len(placeholders) != 1:
        return f"its forward takes {len(placeholders)} inputs, not one"
    ret = outputs[0].args[0]
    if not isinstance(ret, fx.Node) or ret.op != "call_function" or ret.target is not conv_fn:
        return f"its forward does not return {conv_fn.__name__}(...) as it is"
    args = dict(zip(_CONV_ARGS, ret.args)) | dict(ret.kwargs)
    args = _CONV_DEFAULTS | args
    weight, bias = args["weight"], args["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target == "weight"):
        return "its convolution does not use self.weight as it is"
    if module.bias is None:
        if bias is not None:
            return "its convolution adds a bias the module does not hold"
    elif not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == "bias"):
        return "its convolution does not use self.bias as it is"
    for what in ("stride", "dilation"):
        value = _ints(args[what], n, what)
        if value != tuple(getattr(module, what)):
            return value if isinstance(value, str) else f"its convolution's {what} {value} is not self.{what}"
    if args["groups"] != module.groups:
        return f"its convolution's groups {args['groups']!r} is not self.groups"
    total = _conv_padding(args["padding"], module, n)
    if isinstance(total, str):
        return total
    # walk back from the conv's input to the placeholder: only constant zero pads on the way
    cur = args["input"]
    chain = [ret, weight] + ([bias] if isinstance(bias, fx.Node) else [])
    while isinstance(cur, fx.Node) and cur.op != "placeholder":
        amounts = _pad_amounts(cur, mods, n)
        if isinstance(amounts, str):
            return amounts
        total = tuple(a + b for a, b in zip(total, amounts))
        chain.append(cur)
        if len(cur.users) != 1 or not cur.args:
            return "an intermediate value of its forward is used twice"
        cur = cur.args[0]
    if cur is not placeholders[0]:
        return "its convolution's input is not the module's input"
    extra_nodes = [nd for nd in nodes if nd.op not in ("placeholder", "output") and nd not in chain]
    if extra_nodes:
        return f"its forward also runs {_describe(extra_nodes[0])}"
    before_after = [(total[2 * i], total[2 * i + 1]) for i in range(n)]  # F.pad order
    conv_padding = tuple(min(p) for p in reversed(before_after))
    return PadThenConv(conv_padding, _extra(before_after))


def _extra(before_after: list[tuple[int, int]]) -> tuple[int, ...]:
    out: list[int] = []
    for before, after in before_after:
        common = min(before, after)
        out += [before - common, after - common]
    return tuple(out)


def conv_subclass_reason(module: nn.Module) -> str | None:
    """None when a conv subclass with its own forward is lowerable; else why not."""
    plan = analyse_conv_subclass(module)
    return plan if isinstance(plan, str) else None




def plain_view(module: nn.Module, plan: PadThenConv) -> nn.Module:
    """The quantized ``module`` seen as quanta's own simulated conv of its type (sharing its
    weights and quantizers) with ``plan``'s symmetric padding, and ``extra_padding`` set when
    the plan pads asymmetrically: what the integer conv classes lower."""
    from ..nn.modules.weighted import QuantConv1d, QuantConv2d, QuantConv3d

    cls = next(c for c in (QuantConv1d, QuantConv2d, QuantConv3d) if isinstance(module, c))
    view = cls.__new__(cls)
    view.__dict__.update(module.__dict__)
    view.padding, view.padding_mode = plan.conv_padding, "zeros"
    view._reversed_padding_repeated_twice = [p for p in reversed(plan.conv_padding) for _ in range(2)]
    if not plan.symmetric:
        view.extra_padding = plan.extra
    return view


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def runs_layer_op(module: nn.Module) -> bool:
    """True for a conv/linear (or user subclass) whose forward provably computes its layer op
    on its own weight: torch's own forward, or a conv subclass's constant zero padding then the
    conv (`analyse_conv_subclass`). BatchNorm folds into it and per-channel scaling passes
    through it exactly; a subclass with any other forward is not."""
    for base in _WEIGHTED:
        if isinstance(module, base):
            cls = type(module)
            if cls.forward is base.forward and (not hasattr(base, "_conv_forward")
                                                or cls._conv_forward is base._conv_forward):
                return True
            return base is not nn.Linear and isinstance(analyse_conv_subclass(module), PadThenConv)
    return False


class LayerLeafTracer(fx.Tracer):
    """``torch.fx`` tracer for which every conv/linear that `runs_layer_op` is one node (a user
    subclass too), so passes that pair layers (BatchNorm folding) see it as a layer."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _WEIGHTED) and runs_layer_op(m)) or super().is_leaf_module(m, qualname)


def traced_calls(model: nn.Module, tracer: fx.Tracer) -> tuple[fx.Graph, dict[str, nn.Module], dict[str, int]]:
    """``model`` traced by ``tracer`` (raises what tracing raises), its modules by name, and how
    many times the graph calls each module (a module called twice cannot be paired at one site)."""
    graph = tracer.trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return graph, dict(model.named_modules()), calls


__all__ = ["LayerLeafTracer", "PadThenConv", "analyse_conv_subclass", "conv_subclass_reason", "plain_view",
           "runs_layer_op", "traced_calls"]
