"""GPTQ (Frantar et al. 2022): error-compensating rounding of weight-quantized Linear layers (and
transformers' ``Conv1D``), one group of layers at a time, on calibration data.

Layers are visited in the order the model calls them; layers called on the very same input
tensor (q / k / v, gate / up) form one group and share one pass over the calibration data. For
each group, a forward pass of the simulated model *as quantized so far* accumulates each layer's
``H = Σ x xᵀ`` from its inputs (after its own input quantizer), so memory holds one ``[in, in]``
matrix per layer of the group, never the activations of the whole model. `gptq_solver.solve`
then rounds the weight column by column, pushing each column's error onto the columns not yet
rounded. The codes reach the integer kernels unchanged: the weight quantizer's range is frozen
(per group: the groups' ranges as GPTQ chose them), the weight is written as ``(codes − zp)·s``,
and the frozen quantizer is checked to give back exactly those codes (else the layer is skipped
and left as it was, never half-changed).

The record lists, per layer, the mean output error ``‖ΔW x‖²`` over the calibration inputs of
round-to-nearest and of GPTQ (both against the layer's float weight, computed from ``H``), and
the layers skipped with the reason."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core.granularity import Layout
from ..core.qparams import choose_qparams, compute_range
from ..core.quantize import quantize
from ..core.spec import Granularity
from ..nn.tensor_quantizer import TensorQuantizer
from ..progress import Progress
from ..transforms.capture import CaptureError
from .adaround import _unsupported
from .capture import calibration_batches
from .fixed_codes import check_codes, freeze_range
from .gptq_solver import SolverError, output_error, solve


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """``blocksize``: columns per lazy batch update; ``percdamp``: dampening added to ``diag(H)``
    as a fraction of its mean (raised ×10 up to ``damp_retries`` times if the Cholesky fails);
    ``act_order``: visit columns by decreasing ``diag(H)`` (groups keep their original columns
    and the scales of the original weight); ``static_groups``: every group's range from the
    original weight (otherwise, without act-order, from the group's columns when GPTQ reaches
    them); ``min_samples``: fewer calibration samples is an error."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    damp_retries: int = 4
    min_samples: int = 32

    def __post_init__(self) -> None:
        for name in ("blocksize", "min_samples", "damp_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "damp_retries" else 1):
                raise ValueError(f"GPTQOptions.{name} must be a {'non-negative' if name == 'damp_retries' else 'positive'} "
                                 f"int, got {v!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp <= 1:
            raise ValueError(f"GPTQOptions.percdamp must be a number in (0, 1], got {self.percdamp!r}")
        for name in ("act_order", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"GPTQOptions.{name} must be True or False, got {getattr(self, name)!r}")


def _is_conv1d(layer: nn.Module) -> bool:
    return callable(getattr(layer, "linear_view", None))


def _candidate(layer: nn.Module) -> bool:
    """A Linear or transformers' Conv1D with an enabled weight quantizer."""
    wq = getattr(layer, "weight_quantizer", None)
    return (isinstance(layer, nn.Linear) or _is_conv1d(layer)) and isinstance(wq, TensorQuantizer) \
        and wq.quantizing


def _reason(layer: nn.Module, shared_with: list[str]) -> str | None:
    """Why GPTQ cannot handle ``layer`` (None: it can)."""
    reason = _unsupported(layer)
    if reason is not None:
        return reason
    if shared_with:
        return f"its weight is shared with {shared_with} (tied): rounding it would change them too"
    w, spec = layer.weight, layer.weight_quantizer.spec
    if w.dim() != 2:
        return f"its weight has {w.dim()} dimensions"
    out_axis, in_axis = (1, 0) if _is_conv1d(layer) else (0, 1)
    g = spec.granularity
    if g is Granularity.PER_CHANNEL and spec.axis % 2 != out_axis:
        return "its weight is quantized per input channel (GPTQ needs ranges along the outputs)"
    if g is Granularity.PER_GROUP:
        if spec.group_axis % 2 != in_axis:
            return "its weight groups run along the outputs (GPTQ needs groups along the inputs)"
        if w.shape[in_axis] % spec.group_size:
            return f"group_size {spec.group_size} does not divide its {w.shape[in_axis]} inputs"
    elif g not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
        return f"its weight granularity {g.value} is not per tensor, per channel or per group"
    return None


def _linear_spec(spec: Any) -> Any:
    """``spec`` on the Linear orientation ``[out, in]`` (channel axis 0, groups along axis 1)."""
    return dataclasses.replace(spec, axis=0 if spec.granularity is Granularity.PER_CHANNEL else spec.axis,
                               group_axis=-1)


def _discover(model: nn.Module, layers: dict[str, nn.Module], batch: Any,
              forward: Callable) -> list[tuple[list[str], bool]]:
    """Groups of layer names, in the order of their first call on ``batch``: layers called once,
    on the very same input tensor, share a group (none of them feeds another). Each with whether
    its layers are called once per forward (then a pass may stop once they have all been called)."""
    order: list[str] = []
    calls: dict[str, int] = dict.fromkeys(layers, 0)
    first_input: dict[str, int | None] = {}  # the call index of the first layer given the same tensor
    alive: dict[int, tuple[weakref.ref, int]] = {}  # id(input) -> (weak reference, call index): holds no tensor

    def make_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name] += 1
            if calls[name] > 1:
                return
            order.append(name)
            first_input[name] = None
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                hit = alive.get(id(args[0]))
                if hit is None or hit[0]() is not args[0]:  # (an id reused after its tensor was freed)
                    hit = alive[id(args[0])] = (weakref.ref(args[0]), len(order) - 1)
                first_input[name] = hit[1]
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    by_input: dict[int, list[str]] = {}
    for name in order:
        key = first_input[name] if calls[name] == 1 else None
        if key is not None and key in by_input:
            by_input[key].append(name)
            continue
        groups.append([name])
        if key is not None:
            by_input[key] = groups[-1]
    return [(g, all(calls[n] == 1 for n in g)) for g in groups]


class _GroupDone(Exception):
    """Raised inside a forward once every layer of the group has had its input (the rest of the
    model is not needed)."""


def _hessians(model: nn.Module, layers: dict[str, nn.Module], batches: list, forward: Callable,
              stop_early: bool) -> dict:
    """``{name: [H = Σ x xᵀ in float64, rows, problem]}`` of each layer's inputs (after its input
    quantizer); with ``stop_early`` each forward stops once every layer has had its input."""
    acc: dict[str, list] = {n: [None, 0, None] for n in layers}
    seen: set[str] = set()

    def make_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                acc[name][2] = "it is called with other than one tensor input"
                return
            x = args[0]
            iq = getattr(mod, "input_quantizer", None)
            if isinstance(iq, TensorQuantizer) and iq.quantizing:
                x = iq(x)
            x = x.detach().reshape(-1, x.shape[-1]).double()
            h = x.t() @ x
            acc[name][0] = h if acc[name][0] is None else acc[name][0] + h
            acc[name][1] += x.shape[0]
            seen.add(name)
            if stop_early and len(seen) == len(layers):
                raise _GroupDone
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                try:
                    forward(model, batch)
                except _GroupDone:
                    pass
    finally:
        for h in handles:
            h.remove()
    return acc


def _gptq_layer(layer: nn.Module, hessian: torch.Tensor, rows: int, opt: GPTQOptions) -> dict:
    wq: TensorQuantizer = layer.weight_quantizer
    conv1d = _is_conv1d(layer)
    orient = (lambda t: t.t() if t.dim() == 2 else t) if conv1d else (lambda t: t)
    w = layer.weight.detach()
    if bool((torch.diagonal(hessian) == 0).all()):
        raise CaptureError("its inputs are all zero on the calibration data")
    spec, lspec = wq.spec, _linear_spec(wq.spec)
    w_lin = orient(w).float().clone()  # (the weight is overwritten below; errors compare against this copy)
    scale, zp, undo = freeze_range(wq, w)  # compact, in the quantizer's orientation
    try:
        if not all(torch.equal(a, b) for a, b in zip(wq.qparams(w), (scale, zp))):
            raise CaptureError("its weight range cannot be frozen without changing its scale")
        lay = Layout(tuple(w_lin.shape), tuple(orient(scale).shape), lspec)

        def per_column(p: torch.Tensor) -> torch.Tensor:
            return lay.restore(lay.to_param(orient(p).float()).expand_as(lay.to_work(w_lin)))

        s_col, z_col = per_column(scale), per_column(zp)
        nearest = quantize(w_lin, orient(scale), orient(zp), lspec).float()  # round-to-nearest codes
        w_nearest = (nearest - z_col) * s_col
        dynamic = spec.granularity is Granularity.PER_GROUP and not opt.act_order and not opt.static_groups \
            and undo is not None
        group_ranges: list[tuple[torch.Tensor, torch.Tensor]] = []

        def group_qparams(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lo, hi = compute_range(cols, dataclasses.replace(lspec, group_size=cols.shape[1]))
            group_ranges.append((lo, hi))
            gs, gz = choose_qparams(lo, hi, lspec)
            return gs.reshape(-1), gz.reshape(-1)

        sol = solve(w_lin, hessian, qmin=spec.qmin, qmax=spec.qmax, scale=None if dynamic else s_col,
                    zero_point=None if dynamic else z_col, blocksize=opt.blocksize, percdamp=opt.percdamp,
                    act_order=opt.act_order, retries=opt.damp_retries,
                    group_size=spec.group_size if dynamic else None, group_qparams=group_qparams if dynamic else None)
        if dynamic:  # freeze the groups' ranges as GPTQ chose them
            lo, hi = (torch.cat([r[i] for r in group_ranges], dim=1) for i in (0, 1))
            wq.set_range(orient(lo).contiguous(), orient(hi).contiguous())
            scale, zp = (t.clone() for t in wq.qparams(w))
            if not (torch.equal(per_column(scale), sol.scale) and torch.equal(per_column(zp).float(), sol.zero_point)):
                raise CaptureError("its groups' ranges cannot be frozen as GPTQ chose them")
        w_hat = (sol.codes - sol.zero_point) * sol.scale
        w_new = orient(w_hat).to(w.dtype).contiguous()
        # faithful by construction, and checked: the frozen quantizer gives back exactly these codes
        check_codes(wq, w_new, scale, zp, orient(sol.codes), "GPTQ's codes")
    except BaseException:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        layer.weight.copy_(w_new)
    changed = int((sol.codes != nearest).sum())
    return {"error_nearest": _short(output_error(w_lin, w_nearest, hessian, rows)),
            "error_gptq": _short(output_error(w_lin, w_hat, hessian, rows)),
            "codes_changed": changed, "changed_fraction": round(changed / max(nearest.numel(), 1), 4),
            "damp": _short(sol.damp), "dead_inputs": sol.dead, "dynamic_groups": dynamic, "rows": rows}


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → every ``module.param`` name holding it (ties included)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def gptq(model: nn.Module, data: Iterable[Any], options: GPTQOptions | None = None, *,
         num_batches: int | None = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
         progress: bool = True) -> dict:
    """GPTQ every weight-quantized Linear / transformers' Conv1D of a prepared (and calibrated)
    simulated ``model``, in place, on ``data`` (a list of batches, run once per group of layers).
    Returns the record: per layer the output error of round-to-nearest and of GPTQ on the
    calibration inputs; layers it cannot handle are listed under ``skipped`` with the reason,
    unchanged."""
    from ..transforms.calibrate import default_forward

    opt, batches, samples = calibration_batches("gptq", data, options, GPTQOptions, num_batches)
    forward = forward_fn or default_forward
    named = [(n, m) for n, m in model.named_modules() if _candidate(m)]
    if not named:
        raise ValueError("gptq: the model has no weight-quantized Linear / Conv1D layer (prepare it first: "
                         "quanta.prepare(model, quanta.preset('weight_only_int4')))")
    owners = _tied(model)
    skipped, rows, layers = [], [], {}
    for name, layer in named:
        shared = [o for o in owners[id(layer.weight)] if o != f"{name}.weight"]
        reason = _reason(layer, shared)
        if reason is None:
            layers[name] = layer
        else:
            skipped.append({"layer": name, "reason": reason})
    was_training = model.training
    model.eval()
    try:
        groups = _discover(model, layers, batches[0], forward) if layers else []
        reached = {n for g, _ in groups for n in g}
        skipped += [{"layer": n, "reason": "the calibration data never reaches it"} for n in layers if n not in reached]
        with Progress("gptq", total=len(reached), unit="layer", enabled=progress) as bar:
            for group, once in groups:
                acc = _hessians(model, {n: layers[n] for n in group}, batches, forward, stop_early=once)
                for name in group:
                    hessian, count, problem = acc[name]
                    try:
                        if problem or hessian is None:
                            raise CaptureError(problem or "the calibration data never reaches it")
                        rows.append({"layer": name, **_gptq_layer(layers[name], hessian, count, opt)})
                    except (CaptureError, SolverError) as e:
                        skipped.append({"layer": name, "reason": str(e)})
                    bar.update()
    finally:
        model.train(was_training)
    better = sum(r["error_gptq"] <= r["error_nearest"] for r in rows)
    note = f"{len(rows)} layer(s) rounded by GPTQ on {samples} samples in {len(groups)} pass(es) over them " \
        f"({better} with less output error than round-to-nearest)" + (f"; {len(skipped)} skipped" if skipped else "")
    return {"algorithm": "gptq", "options": dataclasses.asdict(opt), "layers": rows, "skipped": skipped,
            "groups": [g for g, _ in groups], "note": note}


def run(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry (`pipeline.REGISTRY`): ``ctx.options`` is the `GPTQOptions` of the config."""
    return gptq(model, ctx.data, ctx.options, num_batches=ctx.num_batches, forward_fn=ctx.forward_fn,
                progress=ctx.progress)
