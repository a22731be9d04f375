"""Cross-layer equalization and high-bias absorption: float function kept, pairs found
(depthwise → pointwise, Conv2d subclasses), ReLU6 / own-forward / no-pair models left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from mobilenet import TinyMobileNetV2
from torch import nn

from quanta import fold_batchnorm
from quanta.algorithms import (
    absorb_high_bias,
    batchnorm_statistics,
    bn_pairs,
    cross_layer_equalization,
)


def _randomized(act: type = nn.ReLU) -> nn.Module:
    """An untrained model with BatchNorm statistics and affine parameters spread over channels."""
    torch.manual_seed(0)
    model = TinyMobileNetV2(act)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n) * 0.2)
            m.running_var.copy_(torch.rand(n) * 4 + 0.05)
            m.weight.data.copy_(torch.exp(torch.randn(n)))
            m.bias.data.copy_(torch.randn(n))
    return model.eval()


def _ranges(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def test_cle_keeps_the_float_function_of_a_trained_mobilenet(trained_mobilenet, digits16) -> None:
    model = copy.deepcopy(trained_mobilenet)
    fold_batchnorm(model)
    x = digits16.x_test[:64]
    with torch.no_grad():
        before = model(x)
    spread = float(_ranges(model, "features.2.block.1.0").max() / _ranges(model, "features.2.block.1.0").min())
    record = cross_layer_equalization(model)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    pairs = {(p["first"], p["second"]) for p in record["pairs"]}
    # expand → depthwise and depthwise → pointwise of each block (through ReLU)
    assert ("features.2.block.0.0", "features.2.block.1.0") in pairs
    assert ("features.2.block.1.0", "features.2.block.2.0") in pairs
    assert len(pairs) == 6, record
    depthwise = _ranges(model, "features.2.block.1.0")
    assert float(depthwise.max() / depthwise.min()) < spread / 4  # the ranges moved closer together


def test_cle_through_relu6_is_skipped_and_the_model_is_unchanged() -> None:
    model = _randomized(nn.ReLU6)
    fold_batchnorm(model)
    state = copy.deepcopy(model.state_dict())
    record = cross_layer_equalization(model)
    assert record["pairs"] == []
    assert "no equalizable" in record["note"]
    assert any("ReLU6" in s for s in record["skipped"])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_cle_on_a_model_without_pairs_says_so_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    state = copy.deepcopy(model.state_dict())
    record = cross_layer_equalization(model)
    assert record["pairs"] == [] and record["note"].startswith("no equalizable")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class PaddedConv(nn.Conv2d):
    """A subclass that only configures torch's Conv2d (its own padding): safe to equalize."""

    def __init__(self, cin: int, cout: int, groups: int = 1) -> None:
        super().__init__(cin, cout, 3, padding=1, padding_mode="zeros", groups=groups)


class ScaledConv(nn.Conv2d):
    """A subclass with its own forward: CLE cannot prove it linear per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).tanh()


def test_conv2d_subclasses_equalized_when_plain_skipped_with_own_forward() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(PaddedConv(2, 8), nn.ReLU(), PaddedConv(8, 8, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        plain[0].weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
    x = torch.randn(3, 2, 7, 7)
    before = plain(x).detach()
    record = cross_layer_equalization(plain)
    assert [(p["first"], p["second"]) for p in record["pairs"]] == [("0", "2"), ("2", "4")]
    torch.testing.assert_close(plain(x).detach(), before, rtol=1e-5, atol=1e-5)

    own = nn.Sequential(ScaledConv(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    state = copy.deepcopy(own.state_dict())
    record = cross_layer_equalization(own)
    assert record["pairs"] == [] and any("ScaledConv" in s and "own forward" in s for s in record["skipped"])
    assert all(torch.equal(v, state[k]) for k, v in own.state_dict().items())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_sequential_order() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    with torch.no_grad():
        model.body[0].weight.mul_(torch.logspace(-2, 1, 16).reshape(-1, 1))
    x = torch.randn(5, 4)
    before = model(x).detach()
    record = cross_layer_equalization(model)
    assert [(p["first"], p["second"]) for p in record["pairs"]] == [("body.0", "body.2")]
    assert any("could not trace" in s for s in record["skipped"])
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    r1, r2 = model.body[0].weight.detach().abs().amax(1), model.body[2].weight.detach().abs().amax(0)
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)  # each channel's two ranges made equal


def test_high_bias_absorption_moves_bias_and_keeps_the_function_approximately() -> None:
    model = _randomized()
    for m in model.modules():  # large positive BatchNorm shift: a high bias after folding
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.abs_().add_(4 * m.weight.data.abs())
    stats = batchnorm_statistics(model, bn_pairs(model))
    fold_batchnorm(model)
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    pw = model.get_submodule("features.1.block.0.0")
    bias_before = pw.bias.detach().clone()
    record = absorb_high_bias(model, stats)
    assert record["pairs"], record
    assert (pw.bias.detach() <= bias_before + 1e-6).all() and (pw.bias.detach() < bias_before - 1e-3).any()
    with torch.no_grad():
        after = model(x)
    # exact except where a pre-activation fell below its absorbed amount or at padded borders
    cos = torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
    assert cos > 0.99


def test_cle_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module"):
        cross_layer_equalization({"weight": torch.zeros(1)})


def test_relu6_model_through_prepare_skips_cle_and_still_corrects_bias() -> None:
    import quanta
    from quanta.algorithms import ALGORITHMS_ATTR

    model = _randomized(nn.ReLU6)
    sim = quanta.prepare(model, quanta.QuantConfig(fold_bn=True, algorithms=("cle", "bias_correction")))
    cle, bc = getattr(sim, ALGORITHMS_ATTR)
    assert cle["pairs"] == [] and sum("ReLU6" in s for s in cle["skipped"]) == 6
    # expand → depthwise and depthwise → project of each block, through ReLU6 (its clipped mean)
    assert len(bc["layers"]) == 6 and all(r["shift_max"] > 0 for r in bc["layers"])
