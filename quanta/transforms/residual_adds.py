"""Residual additions written as ``x + y`` / ``out += identity`` / ``torch.add(a, b)`` become
`quanta.nn.Add` modules, so that they run as integer additions (`quanta.integer.Int8Add`).

Users write residual blocks the way torchvision does (``out += identity``) or TF ports do
(``return x + self.conv(x)``); quanta adds in int8 only through an ``Add`` module. `prepare`
calls `rewrite_residual_adds` before it swaps modules: for each module of the user's own class
(not torch's, not quanta's, not one `prepare` swaps) it traces the module's own ``forward``
with ``torch.fx`` (its children are leaves) and rewrites an addition when it can prove that

- both operands are tensors and one of them is computed by a convolution (`value_kinds`; a
  transformer's residual stream, where 8-bit per-tensor grids lose the outliers, stays float),
- ``+=`` (which fx sees as ``+``) could not write into a tensor used anywhere else: in a
  forward that uses ``+=``, the left operand must be a fresh layer output read only there,
- the trace cannot have fixed a Python decision: the forward is the same in train and eval
  mode (``self.training``), takes no optional or variadic arguments, and never asks
  ``x is None`` / ``isinstance(x, ...)`` of an input; every input is provably a tensor,
- the config runs the new ``Add`` on grids `Int8Add` takes (static per-tensor 8-bit: the
  ``static_int8`` preset; ``module_types={"Add": None}`` or an exclusion keeps them float).

The module keeps its class (``type(block)`` is the user's ``BasicBlock``): its instance gets a
``forward`` generated from the rewritten graph, which calls the same children by name, and a
child ``residual_add`` (``residual_add_<k>`` for the k-th addition of the forward) in place of
the ``+``. With the quantizers off it computes exactly what the float model computes (``a + b``
is what ``Add`` runs). A forward fx cannot trace (data-dependent control flow) stays as it is,
and `quanta.coverage` says why. The rewrite is recorded on the module (`MARK`: the trace's
fingerprint and the rewritten additions) so that `quanta.load` redoes it on the rebuilt float
model, and refuses a file whose module's forward has changed since (`redo_residual_adds`).

The same pass, on the same trace and conditions, makes each attention chain of the forward
(``matmul(q, kᵀ) → scale → + mask → softmax → matmul(·, v)``) one `ScaledDotProductAttention`
child (`attention_rewrite`, recorded in `MARK` as ``"attention"``), in any model, with or
without convolutions.

Limitation: passes that trace the whole model (`quanta.transforms.fuse`) read the root module's
class ``forward`` (torch.fx traces the root through its class), so an addition rewritten in the
root's own forward runs as an integer addition with float output, not on a uint8 chain.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from ..nn.modules.functional import Add
from .attention_rewrite import Chain, attention_chains, child_name, make_child, rewrite
from .conv_subclass import runs_layer_op
from .value_kinds import (
    ADD_FUNCTIONS,
    CONV,
    TENSOR,
    call_sites,
    defined_by_torch_or_quanta,
    node_kinds,
)

#: instance attribute of a rewritten module:
#: ``{"fingerprint": str, "adds": [[index, name], ...], "attention": [[softmax index, name], ...]}``
MARK = "_quanta_residual_adds"
#: prefix of a `prepare` decision for a module whose additions stay float (read by `coverage`)
FLOAT_ADDS = "float additions: "

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FRESH = (*_CONVS, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own ``forward``: every child module is one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def trace_own_forward(mod: nn.Module) -> fx.Graph | str:
    """The graph of ``type(mod).forward`` (children as calls), traced in train and in eval mode
    (they must agree: the trace fixes ``self.training``); else why not (one line)."""
    modes = {m: m.training for m in mod.modules()}
    attrs = {m: dict(m.__dict__) for m in mod.modules()}  # (a forward may store what it computes on self)
    codes, graph = [], None
    try:
        for training in (True, False):
            mod.train(training)
            try:
                with warnings.catch_warnings():  # (what a forward warns about, it warns when it runs)
                    warnings.simplefilter("ignore")
                    graph = _OwnForwardTracer().trace(mod)
            except Exception as e:
                first = str(e).splitlines()[0][:100] if str(e) else ""
                return f"torch.fx cannot trace its forward ({type(e).__name__}: {first})"
            codes.append(graph.python_code("self").src)
    finally:
        for m, training in modes.items():
            if m.__dict__ != attrs[m]:  # no proxy may stay behind on the model
                m.__dict__.clear()
                m.__dict__.update(attrs[m])
            m.training = training
    if codes[0] != codes[1]:
        return "its forward depends on self.training (a traced forward would fix one mode)"
    return graph


def fingerprint(graph: fx.Graph) -> str:
    return hashlib.sha256(graph.python_code("self").src.encode()).hexdigest()[:16]


def candidates(graph: fx.Graph) -> list[fx.Node]:
    """The additions of two traced values, in graph order (their indices name them)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in ADD_FUNCTIONS and len(n.args) == 2
            and not n.kwargs and all(isinstance(a, fx.Node) for a in n.args)]


def _uses_augmented_add(cls: type) -> bool:
    """Whether ``cls.forward``'s source has ``... += ...`` (True when the source cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return True
    return any(isinstance(n, ast.AugAssign) and isinstance(n.op, ast.Add) for n in ast.walk(tree))


_INSPECTING = {"isinstance", "type", "hasattr", "getattr", "callable", "id"}


def _python_checks(cls: type) -> str | None:
    """Why a trace of ``cls.forward`` could fix a Python-level decision about its inputs (optional
    or variadic arguments, ``x is None``, ``isinstance(x, ...)``), or None. (fx would trace
    ``mask is not None`` as True and ``isinstance(x, torch.Tensor)`` as False, for every call.)"""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, ValueError, SyntaxError):
        return "its forward's source cannot be read"
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            return f"its forward takes an optional argument {p.name!r} (a trace would fix one case)"
    names = {p.name for p in params}

    def on_input(node: ast.AST) -> bool:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return isinstance(node, ast.Name) and node.id in names

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _INSPECTING \
                and node.args and on_input(node.args[0]):
            return f"its forward calls {node.func.id}() on an input (a trace would fix the answer)"
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) \
                and any(on_input(v) for v in (node.left, *node.comparators)):
            return "its forward tests an input with `is` (a trace would fix the answer)"
    return None


def _fresh(node: Any, mods: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a new tensor read only by its one user (through Identity / dropout /
    in-place activations, which hand their input on): ``+=`` on it changes nothing else."""
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_function" and node.target in ADD_FUNCTIONS:
            return True
        if node.op != "call_module":
            return False
        m = mods[str(node.target)]
        if isinstance(m, (nn.Identity, nn.Dropout)) or getattr(m, "inplace", False):
            node = node.args[0] if node.args else None
            continue
        return isinstance(m, _FRESH) and (defined_by_torch_or_quanta(type(m)) or runs_layer_op(m))
    return False


def block_problem(mod: nn.Module, graph: fx.Graph, kinds: dict[fx.Node, int]) -> str | None:
    """Why no rewrite of ``mod``'s traced forward may replace its forward (a Python decision the
    trace fixed, an input not provably a tensor), or None."""
    problem = _python_checks(type(mod))
    unproven = [n.name for n in graph.nodes if n.op == "placeholder" and kinds.get(n, 0) < TENSOR]
    return problem if problem is not None or not unproven else f"its input {unproven[0]!r} is not provably a tensor"


def plan(mod: nn.Module, graph: fx.Graph, inputs: list[int], trace: Callable[[nn.Module], Any]
         ) -> tuple[list[int], list[str]]:
    """Which candidate additions of ``mod``'s traced forward can be rewritten (indices), and why
    the others cannot."""
    mods = dict(mod.named_modules())
    kinds = node_kinds(graph, mods, inputs, trace)
    problem = block_problem(mod, graph, kinds)
    if problem is not None:
        return [], [problem]
    augmented = _uses_augmented_add(type(mod))
    ok, why = [], []
    for i, node in enumerate(candidates(graph)):
        a, b = node.args
        ka, kb = kinds.get(a, 0), kinds.get(b, 0)
        what = f"{a.name} + {b.name}"  # type: ignore[union-attr]
        if min(ka, kb) < TENSOR:
            why.append(f"{what}: an operand is not provably a tensor")
        elif max(ka, kb) < CONV:
            why.append(f"{what}: no operand comes from a convolution")
        elif augmented and not _fresh(a, mods):
            why.append(f"{what}: with `+=` in the forward, the left operand may be a tensor used elsewhere")
        else:
            ok.append(i)
    return ok, why


def _add_name(mod: nn.Module, index: int) -> str:
    name = "residual_add" if index == 0 else f"residual_add_{index}"
    while name in mod._modules or name in mod.__dict__ or hasattr(type(mod), name):
        name = "_" + name
    return name


def _rewritten_code(mod: nn.Module, graph: fx.Graph, adds: list[list[Any]], attention: list[list[Any]]
                    ) -> Callable[..., Any]:
    """``graph`` (``mod``'s traced forward) with candidate addition ``index`` calling child ``name``
    for each ``[index, name]`` of ``adds`` (and attention chain ``index`` of ``attention``), as a
    function of ``(module, *inputs)``."""
    nodes, chains = candidates(graph), attention_chains(graph, mod)
    rewrite(graph, [(chains[index], name) for index, name in attention])  # type: ignore[misc]
    for index, name in adds:
        node = nodes[index]
        with graph.inserting_before(node):
            new = graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    return type(fx.GraphModule(mod, graph)).forward


class RewrittenForward:
    """A rewritten module's ``forward`` (an instance attribute: the module keeps its class): the
    generated code of its class's traced forward with the additions calling their ``Add``
    children. Copies follow the module (deepcopy); pickling drops the generated code, which the
    first call rebuilds from the module's class and its `MARK` record."""

    def __init__(self, module: nn.Module, code: Callable[..., Any] | None = None) -> None:
        self.module, self.code = module, code

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.code is None:
            graph = trace_own_forward(self.module)
            recorded = getattr(self.module, MARK)
            if isinstance(graph, str) or fingerprint(graph) != recorded["fingerprint"]:
                raise RuntimeError(f"{type(self.module).__name__}: its forward is not the one quanta rewrote "
                                   "(the code changed since); re-quantize the model")
            self.code = _rewritten_code(self.module, graph, recorded["adds"], recorded.get("attention", []))
        return self.code(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(type(self.module).forward, self.module))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "code": None}


def apply(mod: nn.Module, graph: fx.Graph, sites: list[int], attention: list[int] = ()) -> dict[str, Any]:
    """Rewrite candidate additions ``sites`` of ``mod``'s traced ``graph`` into new ``Add``
    children (and attention chains ``attention`` into `ScaledDotProductAttention` children) and
    give ``mod`` the rewritten forward; returns the record (`MARK`)."""
    fp, adds = fingerprint(graph), [[index, _add_name(mod, index)] for index in sites]
    chains = attention_chains(graph, mod)
    fused = [[index, child_name(mod, index)] for index in attention]
    children = [(name, Add()) for _, name in adds] + [(name, make_child(chains[i])) for i, name in fused]  # type: ignore[arg-type]
    for name, child in children:
        child.train(mod.training)
        mod.add_module(name, child)
    mod.forward = RewrittenForward(mod, _rewritten_code(mod, graph, adds, fused))
    record = {"fingerprint": fp, "adds": adds, "attention": fused}
    setattr(mod, MARK, record)
    return record


def _is_users_block(mod: nn.Module) -> bool:
    from ..integer.base import IntegerModule
    from ..nn.modules.base import QuantModule
    from ..nn.modules.op_base import QuantOp
    from ..nn.registry import lookup

    return (not defined_by_torch_or_quanta(type(mod)) and lookup(mod) is None and MARK not in mod.__dict__
            and not isinstance(mod, (QuantModule, QuantOp, IntegerModule)))


def rewrite_residual_adds(model: nn.Module, wanted: Callable[[str], bool] = lambda name: True,
                          attention: Callable[[str], bool] | None = None) -> dict[str, str]:
    """Rewrite the provable residual additions of ``model`` (in place) whose new module's name
    ``wanted`` accepts (and the attention chains whose child's name ``attention`` accepts);
    returns, per module whose additions stay float, why (one line)."""
    has_conv = any(isinstance(m, _CONVS) for m in model.modules())
    if not has_conv and attention is None:
        return {}  # (an addition is rewritten only where a convolution computes an operand)
    traces: dict[int, Any] = {}

    def trace(m: nn.Module) -> Any:
        if id(m) not in traces:
            traces[id(m)] = trace_own_forward(m)
        return traces[id(m)]

    parents = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    inputs: dict[int, list[int]] = {}
    reasons: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        users_block = _is_users_block(mod)
        if not users_block and not any(True for _ in mod.children()):
            continue
        graph = trace(mod)
        holds_conv = any(isinstance(m, _CONVS) for m in mod.modules())
        if isinstance(graph, str):
            if users_block and holds_conv:
                reasons[name] = FLOAT_ADDS + graph
            continue
        ins = inputs.get(id(mod), []) if parents[id(mod)] == 1 else []
        mods = dict(mod.named_modules())
        for child, args in call_sites(graph, mods, node_kinds(graph, mods, ins, trace)):
            seen = inputs.get(id(child))
            inputs[id(child)] = args if seen is None else [min(a, b) for a, b in zip(seen, args)]
        if not users_block:
            continue
        ok, why = plan(mod, graph, ins, trace) if has_conv and candidates(graph) else ([], [])
        prefix = f"{name}." if name else ""
        chosen = [i for i in ok if wanted(prefix + _add_name(mod, i))]
        fused = []
        if attention is not None and _python_checks(type(mod)) is None:  # (a mask need not be provably a tensor)
            fused = [i for i, c in attention_chains(graph, mod).items()
                     if isinstance(c, Chain) and attention(prefix + child_name(mod, i))]
        if chosen or fused:
            apply(mod, trace_own_forward(mod), chosen, fused)  # (a fresh graph: `trace` may still hand out the old one)
        if why and holds_conv:
            reasons[name] = FLOAT_ADDS + "; ".join(why)
    return reasons


def runs_as_integer_add(config: Any) -> Callable[[str], bool]:
    """For `rewrite_residual_adds`: whether ``config`` (a `QuantConfig`) would quantize an ``Add``
    named so on grids `quanta.integer.Int8Add` takes (static per-tensor 8-bit)."""
    from ..integer.add import _operand_problem
    from ..nn.modules.functional import QuantAdd

    def wanted(name: str) -> bool:
        decision = config.decide(name, Add())
        if decision.config is None:
            return False
        try:
            sim = QuantAdd.from_float(Add(), decision.config)
        except (TypeError, ValueError):
            return False
        quantizers = (sim.input_quantizer, sim.other_quantizer)
        return all(q is not None and q.is_enabled and _operand_problem(q.spec) is None for q in quantizers)

    return wanted


def redo_residual_adds(mod: nn.Module, recorded: Any, where: str) -> None:
    """Redo the rewrite `MARK` recorded on the float module ``mod`` at ``where`` (loading a file):
    the same trace, the same additions, the same names; ValueError when its forward changed."""
    if not (isinstance(recorded, dict) and isinstance(recorded.get("fingerprint"), str)
            and all(isinstance(recorded.get(key, []), list) and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                and isinstance(p[1], str) for p in recorded.get(key, [])) for key in ("adds", "attention"))
            and isinstance(recorded.get("adds"), list)):
        raise ValueError(f"module {where!r}: malformed residual-add record")
    graph = trace_own_forward(mod)
    if isinstance(graph, str):
        raise ValueError(f"module {where!r} ({type(mod).__name__}): the file rewrote additions of its forward, "
                         f"but now {graph}")
    if fingerprint(graph) != recorded["fingerprint"]:
        raise ValueError(f"module {where!r} ({type(mod).__name__}): its forward is not the one the file's "
                         "residual additions were rewritten from (the code changed since saving); re-quantize "
                         "the model")
    sites = [p[0] for p in recorded["adds"]]
    if any(i < 0 or i >= len(candidates(graph)) for i in sites) or len(set(sites)) != len(sites):
        raise ValueError(f"module {where!r}: the file's residual additions {sites} are not additions of its forward")
    chains = attention_chains(graph, mod)
    fused = [p[0] for p in recorded.get("attention", [])]
    if any(not isinstance(chains.get(i), Chain) for i in fused) or len(set(fused)) != len(fused):
        raise ValueError(f"module {where!r}: the file's fused attention {fused} are not attention chains of its forward")
    done = apply(mod, graph, sites, fused)
    if done["adds"] != recorded["adds"] or done["attention"] != recorded.get("attention", []):
        raise ValueError(f"module {where!r}: its rewritten children would be named {done['adds'] + done['attention']}, "
                         f"the file says {recorded['adds'] + recorded.get('attention', [])}")


__all__ = ["FLOAT_ADDS", "MARK", "redo_residual_adds", "rewrite_residual_adds", "runs_as_integer_add",
           "trace_own_forward"]
