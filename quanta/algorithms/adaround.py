"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
learn, layer by layer on calibration data, whether each weight rounds up or down.

Each weight-quantized conv / linear in turn: its input is captured from the simulated model as
quantized so far (earlier layers already AdaRounded), its target output from the float model
(every quantizer off); the soft rounding ``h(V) = clip(sigmoid(V)(ζ−γ)+γ, 0, 1)`` is learned with
Adam on ``‖W̃x − Wx‖² + λ Σ(1 − |2h(V)−1|^β)``, β annealed from 20 to 2 after a warm-up without the
regulariser. The learned codes ``floor(W/s) + [h(V) ≥ 0.5]`` are written back as the weight
``(codes − zp)·s`` with the weight quantizer's range frozen, so that the simulated model and
`quanta.convert` re-quantize it to exactly those codes (checked before anything is written;
a layer that would not is skipped and reported, never half-changed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core.granularity import Layout
from ..core.quantize import quantize
from ..core.spec import Format
from ..nn.tensor_quantizer import TensorQuantizer
from ..progress import Progress
from ..transforms.capture import CaptureError, capture_layer
from .capture import calibration_batches, quantizers_off
from .fixed_codes import check_codes, freeze_range

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch


@dataclasses.dataclass(frozen=True)
class AdaRoundOptions:
    """How hard AdaRound works per layer. The paper runs 10k iterations with λ = 0.01; with a few
    hundred, λ = 0.1 is needed to drive h(V) to 0 / 1 before the hard rounding (with 0.01 a fifth
    to a third of h(V) stay soft after 300 iterations and the 4-bit test model loses ~15 points)."""

    iterations: int = 300
    lr: float = 1e-2
    reg_weight: float = 0.1  # λ
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the rounding regulariser
    batch_size: int = 32  # samples per Adam step
    min_samples: int = 64  # fewer calibration samples than this: an error
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "min_samples", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
                raise ValueError(f"AdaRoundOptions.{name} must be a positive int, got {v!r}")
        for name in ("lr", "reg_weight", "beta_start", "beta_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (v == 0 and name != "reg_weight"):
                raise ValueError(f"AdaRoundOptions.{name} must be a positive number, got {v!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"AdaRoundOptions.warmup must be in [0, 1), got {self.warmup!r}")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V)(ζ−γ)+γ, 0, 1)``."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def _unsupported(layer: nn.Module) -> str | None:
    wq = getattr(layer, "weight_quantizer", None)
    if not isinstance(wq, TensorQuantizer) or not wq.quantizing:
        return "its weights are not quantized"
    if tuple(getattr(layer, "weight_names", ("weight",))) != ("weight",):
        return "it has several weights"
    spec = wq.spec
    if spec.format is not Format.INT or spec.dynamic or spec.bits < 2:
        return f"its weight format ({spec.format.value}, {spec.bits} bits{', dynamic' if spec.dynamic else ''}) " \
               "has no integer grid to round onto"
    if isinstance(wq.amax, nn.Parameter) and wq.amax.requires_grad:
        return "its weight range is learned (train it first, then freeze it)"
    return None


class _Grid:
    """A layer's weight on its (frozen) quantization grid: ``v = W·(1/s)``, floor, zero point."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, wq: TensorQuantizer) -> None:
        self.spec, self.scale, self.zp = wq.spec, scale, zp
        self.lay = Layout(tuple(w.shape), tuple(scale.shape), wq.spec)
        self.s, self.z = self.lay.to_param(scale.float()), self.lay.to_param(zp.float())
        v = self.lay.to_work(w.float()) * (1.0 / self.s)
        self.floor = torch.floor(v)
        self.rest = v - self.floor

    def weight(self, up: torch.Tensor) -> torch.Tensor:
        """The weight for rounding-up amounts ``up`` (in [0, 1], soft or hard)."""
        q = (self.floor + up + self.z).clamp(self.spec.qmin, self.spec.qmax)
        return self.lay.restore((q - self.z) * self.s)

    def codes(self, up: torch.Tensor) -> torch.Tensor:
        return self.lay.restore((self.floor + up + self.z).clamp(self.spec.qmin, self.spec.qmax))


def _output(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with ``weight`` used as it is (its weight quantizer off meanwhile)."""
    wq = layer.weight_quantizer
    wq.disable()
    try:
        with layer.quantized_weights({"weight": weight}):
            return layer(x)
    finally:
        wq.enable()


def _recon(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = (out - target).float()
    return diff.pow(2).sum(1).mean() if diff.dim() > 1 else diff.pow(2).mean()


@torch.no_grad()
def _full_loss(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> float:
    return sum(float(_recon(_output(layer, weight, xb), tb)) * len(xb)
               for xb, tb in zip(x.split(256), target.split(256))) / len(x)


def _learn(layer: nn.Module, grid: _Grid, x: torch.Tensor, target: torch.Tensor, opt: AdaRoundOptions) -> torch.Tensor:
    """The learned hard rounding-up amounts (0 or 1 per weight)."""
    v = _inverse_rectified_sigmoid(grid.rest).requires_grad_(True)
    adam = torch.optim.Adam([v], lr=opt.lr)
    g = torch.Generator().manual_seed(opt.seed)
    warm = int(opt.warmup * opt.iterations)
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for it in range(opt.iterations):
                idx = torch.randint(len(x), (min(opt.batch_size, len(x)),), generator=g)
                h = rectified_sigmoid(v)
                loss = _recon(_output(layer, grid.weight(h), x[idx]), target[idx])
                if it >= warm:
                    t = (it - warm) / max(opt.iterations - warm - 1, 1)
                    beta = opt.beta_end + (opt.beta_start - opt.beta_end) * (1 - t)
                    loss = loss + opt.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
                adam.zero_grad()
                loss.backward()
                adam.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return (rectified_sigmoid(v.detach()) >= 0.5).float()


def _adaround_layer(model: nn.Module, layer: nn.Module, batches: list, forward: Callable,
                    opt: AdaRoundOptions) -> dict:
    wq: TensorQuantizer = layer.weight_quantizer
    x = capture_layer(model, layer, batches, forward, "input")
    with quantizers_off(model):
        target = capture_layer(model, layer, batches, forward, "output")
    w = layer.weight.detach()
    scale, zp, undo = freeze_range(wq, w)
    try:
        frozen_scale, frozen_zp = wq.qparams(w)
        if not (torch.equal(frozen_scale, scale) and torch.equal(frozen_zp, zp)):
            raise CaptureError("its weight range cannot be frozen without changing its scale")
        grid = _Grid(w, scale, zp, wq)
        nearest = quantize(w.float(), scale, zp, wq.spec).float()
        up_nearest = grid.lay.to_work(nearest) - grid.floor - grid.z
        up = _learn(layer, grid, x, target, opt)
        before = _full_loss(layer, grid.weight(up_nearest).to(w.dtype), x, target)
        after = _full_loss(layer, grid.weight(up).to(w.dtype), x, target)
        kept_nearest = after > before  # on the whole calibration set, learned rounding lost: keep nearest
        if kept_nearest:
            up, after = up_nearest, before
        codes, w_new = grid.codes(up), grid.weight(up).to(w.dtype)
        # faithful by construction, and checked: the frozen quantizer gives back exactly these codes
        check_codes(wq, w_new, scale, zp, codes, "the learned codes")
    except BaseException:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        layer.weight.copy_(w_new)
    flips = int((codes != nearest).sum())
    return {"flips": flips, "flip_fraction": round(flips / max(codes.numel(), 1), 4),
            "loss_nearest": round(before, 6), "loss_adaround": round(after, 6), "kept_nearest": kept_nearest,
            "samples": len(x)}


def adaround(model: nn.Module, data: Iterable[Any], options: AdaRoundOptions | None = None, *,
             num_batches: int | None = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
             progress: bool = True) -> dict:
    """AdaRound every weight-quantized conv / linear of a calibrated simulated ``model``, in place,
    on ``data`` (a list of batches, reused once per layer). Returns the record: per layer the
    rounding flips against round-to-nearest and the reconstruction loss before / after; layers it
    cannot handle are listed under ``skipped`` with the reason, unchanged."""
    from ..transforms.calibrate import default_forward

    opt, batches, samples = calibration_batches("adaround", data, options, AdaRoundOptions, num_batches)
    forward = forward_fn or default_forward
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    owners: dict[int, list[str]] = {}
    for n, m in layers:
        owners.setdefault(id(m.weight), []).append(n)
    rows, skipped = [], []
    was_training = model.training
    model.eval()
    try:
        with Progress("adaround", total=len(layers), unit="layer", enabled=progress) as bar:
            for name, layer in layers:
                reason = _unsupported(layer)
                if reason is None and len(owners[id(layer.weight)]) > 1:
                    reason = f"its weight is shared with {[o for o in owners[id(layer.weight)] if o != name]}"
                if reason is None:
                    try:
                        rows.append({"layer": name, **_adaround_layer(model, layer, batches, forward, opt)})
                    except CaptureError as e:
                        reason = str(e)
                if reason is not None and _unsupported(layer) != "its weights are not quantized":
                    skipped.append({"layer": name, "reason": reason})
                bar.update()
    finally:
        model.train(was_training)
    flips = sum(r["flips"] for r in rows)
    note = f"{len(rows)} layer(s) rounded ({flips} flip(s) vs nearest) on {samples} samples" \
        + (f"; {len(skipped)} skipped" if skipped else "")
    return {"algorithm": "adaround", "options": dataclasses.asdict(opt), "layers": rows, "skipped": skipped,
            "note": note}


def run(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry (`pipeline.REGISTRY`): ``ctx.options`` is the `AdaRoundOptions` of the config."""
    return adaround(model, ctx.data, ctx.options, num_batches=ctx.num_batches, forward_fn=ctx.forward_fn,
                    progress=ctx.progress)
