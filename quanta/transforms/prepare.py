"""`prepare`: a float model → a simulated (fake-quantized) model, by module swap."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..algorithms.pipeline import AlgorithmContext, at_stage, before_quantizers, needs_data, run_stage
from ..integer.base import IntegerModule
from ..nn.modules.fused_attention import ScaledDotProductAttention
from ..nn.modules.op_base import QuantOp
from ..nn.registry import known_type_names, lookup
from ..nn.tensor_quantizer import TensorQuantizer
from .attention_rewrite import runs_fused
from .config import QuantConfig, _matches
from .coverage import coverage
from .decisions import DECISIONS_ATTR, UNSUPPORTED
from .fold_bn import fold_batchnorm
from .residual_adds import rewrite_residual_adds, runs_as_integer_add
from .tied import quantize_tied_tables

#: attribute of a prepared model's root: the applied config (the per-module decisions: `decisions.py`)
CONFIG_ATTR = "_quanta_config"


def check_float_model(model: Any, who: str) -> None:
    """Raise a one-line error unless ``model`` is a float (or simulated) ``nn.Module``."""
    if isinstance(model, nn.Module):
        done = next(((n, m) for n, m in model.named_modules() if isinstance(m, IntegerModule)), None)
        if done is not None:
            where = f" ({done[0]!r} is a {type(done[1]).__name__})" if done[0] else ""
            raise ValueError(f"{who}: {type(model).__name__} is already an integer model{where}; "
                             "quantize the float model instead")
        return
    if isinstance(model, Mapping):
        raise TypeError(f"{who} expects an nn.Module, got a {type(model).__name__} (a state_dict?): build the "
                        "model, call model.load_state_dict(state_dict) and pass the model")
    if inspect.isclass(model):
        raise TypeError(f"{who} expects an nn.Module instance, got the class {model.__name__}: "
                        f"pass {model.__name__}(...)")
    if callable(model):
        name = getattr(model, "__name__", type(model).__name__)
        raise TypeError(f"{who} expects an nn.Module, got the function {name!r}: pass the model it builds "
                        f"({name}(...)); a plain function cannot be quantized")
    raise TypeError(f"{who} expects an nn.Module, got {type(model).__name__}")


def prepare(model: nn.Module, config: QuantConfig | None = None, inplace: bool = False,
            verbose: bool = False, *, calib_data: Iterable[Any] | None = None, num_batches: int | None = None,
            forward_fn: Callable[[nn.Module, Any], Any] | None = None, progress: bool = True) -> nn.Module:
    """Return a simulated copy of ``model`` (or ``model`` itself with ``inplace=True``).

    Every module whose class (or closest base class) is registered is swapped for its
    quantized version, sharing parameters; other modules run in float and are counted by
    `quanta.coverage`. The float model is never modified unless ``inplace=True``.

    A layer whose shape its config cannot take (``group_size 32 does not divide 40``) stays
    float, with a warning and the reason in `quanta.coverage` and the conversion report, unless
    a rule or exclusion names it exactly (then that is an error).

    ``config.algorithms`` of the ``float`` and ``simulated`` stages run here (`quanta.algorithms`);
    those that need data take ``calib_data`` (a list of batches, or an iterable read once;
    ``num_batches``, ``forward_fn`` as in `quanta.calibrate`).
    """
    check_float_model(model, "prepare")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_type_names(model, config)
    if config.fold_bn and model.training:
        raise ValueError("QuantConfig.fold_bn needs the model in eval mode (BatchNorm running "
                         "statistics): call model.eval() first")
    early = at_stage(config.algorithms, "float") + at_stage(config.algorithms, "simulated")
    wanting = needs_data(early)
    if wanting and calib_data is None:
        raise ValueError(f"QuantConfig.algorithms {wanting[0]!r} needs calibration data: pass calib_data")
    if isinstance(calib_data, torch.Tensor):
        raise TypeError("calib_data must be an iterable of batches (a list of tensors); wrap a single tensor as [tensor]")
    ctx = AlgorithmContext(config=config, data=None if not wanting else list(itertools.islice(calib_data, num_batches)),
                           num_batches=num_batches, forward_fn=forward_fn, progress=progress)
    target = model if inplace else copy.deepcopy(model)
    statistics = None
    if early:  # BatchNorm statistics read, then folded; the float-stage algorithms on the folded float model
        statistics = before_quantizers(target, config.algorithms, fold_batchnorm if config.fold_bn else None,
                                       ctx, config.algorithm_options)
    elif config.fold_bn:
        fold_batchnorm(target)
    # `x + y` / `out += identity` of a CNN's residual blocks: quanta.nn.Add children, swapped below
    # and attention written as matmul-softmax-matmul in a block's forward: one fused float call
    decisions: dict[str, str] = rewrite_residual_adds(target, runs_as_integer_add(config), runs_fused(config))
    root_cls = lookup(target)
    if root_cls is not None:  # the model itself is a quantizable layer
        decision = config.decide("", target)
        if decision.config is not None:
            target = root_cls.from_float(target, decision.config)
    _swap(target, "", config, decisions)
    quantize_tied_tables(target, decisions)  # a tied embedding takes its Linear's weight quantizer
    if statistics is not None:  # e.g. analytical bias correction: with the weight quantizers in place
        run_stage(target, "simulated", config.algorithms, dataclasses.replace(ctx, statistics=statistics),
                  config.algorithm_options)
    for name, mod in target.named_modules():
        if isinstance(mod, nn.TransformerEncoder):
            # its nested-tensor fast path would hand the quantized layers nested tensors
            mod.use_nested_tensor = False
        elif type(mod) is nn.TransformerEncoderLayer and any(isinstance(m, TensorQuantizer) for m in mod.modules()):
            warnings.warn(f"quanta: {name or type(mod).__name__!r} is a float TransformerEncoderLayer holding "
                          "quantized submodules; in eval mode under no_grad torch's fused fast path skips "
                          "them (quantize the layer itself, or exclude its submodules instead)",
                          UserWarning, stacklevel=2)
    for name, mod in target.named_modules():
        if isinstance(mod, TensorQuantizer):
            mod.name = name  # so that its messages (e.g. "has no range") say which one
    _warn_unmatched(target, config)
    unsupported = [(n, r) for n, r in decisions.items() if r.startswith(UNSUPPORTED)]
    if unsupported:
        listed = "; ".join(f"{n!r}: {r[len(UNSUPPORTED):]}" for n, r in unsupported[:4])
        warnings.warn(f"quanta: {len(unsupported)} layer(s) stay float (their shape does not fit the config): "
                      f"{listed}{' …' if len(unsupported) > 4 else ''}", UserWarning, stacklevel=2)
    setattr(target, CONFIG_ATTR, config)
    setattr(target, DECISIONS_ATTR, decisions)
    if verbose:
        print(coverage(target))
    return target


def _swap(module: nn.Module, prefix: str, config: QuantConfig, decisions: dict[str, str]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, TensorQuantizer):
            continue
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, QuantOp) and config.module_types.get(type(child).__name__, child) is None:
            # an op a quantized module made (MultiheadAttention's qk / av matmuls) whose type the
            # config maps to None: it computes in float (whatever rules say of its scopes)
            for kind, _ in list(child.quantizers()):
                setattr(child, f"{kind}_quantizer", None)
            decisions[full] = f"type:{type(child).__name__}"
            continue
        decision = config.decide(full, child)
        qcls = lookup(child)
        if decision.config is None:  # excluded: it stays float
            decisions[full] = decision.reason
            if decision.reason.startswith("type:"):
                continue  # and so does everything inside it
            # excluded by a pattern: modules inside stay float too (their scopes match it)
            # unless a more specific pattern quantizes them, as QuantConfig documents
        elif qcls is not None:
            try:
                new = qcls.from_float(child, decision.config)
            except (ValueError, TypeError) as e:
                if decision.reason in (f"rule:{full!r}",):  # the user asked for this very module
                    raise type(e)(f"cannot quantize module {full!r} ({type(child).__name__}): {e}") from e
                decisions[full] = f"{UNSUPPORTED}{e}"  # (the module is untouched: from_float copies)
            else:
                child = new
                setattr(module, name, child)
                decisions[full] = decision.reason
        _swap(child, full, config, decisions)


def _check_type_names(model: nn.Module, config: QuantConfig) -> None:
    """A `QuantConfig.module_types` name that is no registered class (or base) and no class of the
    model is a typo or a class quanta does not know: it would be silently ignored, so raise."""
    if not config.module_types:
        return
    known = known_type_names() | {c.__name__ for m in model.modules() for c in type(m).__mro__} | _op_type_names()
    known.add(ScaledDotProductAttention.__name__)  # (made by prepare: attention_rewrite)
    for name in config.module_types:
        if name in known:
            continue
        close = [k for k in sorted(known) if k.lower() == name.lower()]
        close += [k for k in difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6) if k not in close]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"QuantConfig.module_types: unknown type name {name!r}: no quantizable class is "
                         f"registered under it and no module of {type(model).__name__} has it{hint}")


def _op_type_names(cls: type = QuantOp) -> set[str]:
    """``QuantOp`` and its subclasses' names: a quantized module may create them (``QuantMatMul``)."""
    names = {cls.__name__}
    for sub in cls.__subclasses__():
        names |= _op_type_names(sub)
    return names


def _warn_unmatched(model: nn.Module, config: QuantConfig) -> None:
    names = [n for n, m in model.named_modules() if n and not isinstance(m, TensorQuantizer)]
    for pattern in config.patterns():
        if not any(_matches(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f"; closest module names: {', '.join(close)}" if close else ""
            warnings.warn(f"quanta: rule {pattern!r} matches no module of {type(model).__name__}{hint}",
                          UserWarning, stacklevel=3)
