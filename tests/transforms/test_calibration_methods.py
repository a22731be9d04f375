"""Every calibration method on trained models: none may collapse (tier 2).

Each method (max, moving average, percentile, MSE, entropy) calibrates the trained digits CNN
(post-ReLU activations: half exact zeros) and the trained transformer classifier (signed
activations after LayerNorm, post-ReLU ones in the feed-forward block), under two activation
grids: the ``static_int8`` preset's affine uint8 and a signed symmetric int8. Margins, against
fp32 on the held-out split:

- every method: logit SQNR within 2 dB of the best method, accuracy within 1 point of fp32;
- entropy: SQNR at most 1.5 dB and accuracy at most 1 point below the worse of percentile / MSE.

Before the entropy fix, TensorRT's KL search collapsed on the ReLU zeros (CNN: 8.8 dB and
95.5 % with uint8, -4.8 dB and 11 % with int8, where percentile/MSE give about 32.8 dB, 97.5 %).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.demo import accuracy
from quanta.nn import LayerQuantConfig, QuantDescriptor

METHODS = ("max", "moving_average", "percentile", "mse", "entropy")
HISTOGRAM_METHODS = ("percentile", "mse", "entropy")
SIGNED_INT8 = quanta.QuantConfig(
    default=LayerQuantConfig(input=QuantDescriptor(), weight=QuantDescriptor(per_channel=True, narrow_range=True)),
    fold_bn=True,
)
CONFIGS = {"uint8_affine": lambda: quanta.preset("static_int8"), "int8_symmetric": lambda: SIGNED_INT8}
MODELS = {"digits_cnn": ("trained_cnn", "digits_data"), "transformer": ("trained_transformer", "token_data")}


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum()))


def _calibrated(model: nn.Module, config: quanta.QuantConfig, batches, method: str) -> nn.Module:
    sim = quanta.prepare(model, config)
    quanta.calibrate(sim, batches, method, progress=False)
    return sim


@pytest.fixture(scope="module")
def scores(request) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """``{(model, grid): {method: (accuracy %, logit SQNR dB)}}``, plus ``"float"``'s accuracy."""
    out = {}
    for model_key, (model_fixture, data_fixture) in MODELS.items():
        model, data = request.getfixturevalue(model_fixture), request.getfixturevalue(data_fixture)
        with torch.no_grad():
            ref = model(data.x_test)
        float_acc = accuracy(model, data.x_test, data.y_test)
        for grid, config in CONFIGS.items():
            row = {"float": (float_acc, float("inf"))}
            for method in METHODS:
                sim = _calibrated(model, config(), data.calib_batches(4, 64), method)
                with torch.no_grad():
                    row[method] = (accuracy(sim, data.x_test, data.y_test), _sqnr_db(ref, sim(data.x_test)))
            out[model_key, grid] = row
    return out


CASES = [pytest.param(m, g, id=f"{m}-{g}") for m in MODELS for g in CONFIGS]


@pytest.mark.parametrize("model_key,grid", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_no_method_collapses(scores, model_key, grid, method):
    row = scores[model_key, grid]
    float_acc = row["float"][0]
    assert float_acc > 90  # really a trained model
    best = max(row[m][1] for m in METHODS)
    acc, sqnr = row[method]
    assert sqnr >= best - 2.0, (method, row)
    assert acc >= float_acc - 1.0, (method, row)


@pytest.mark.parametrize("model_key,grid", CASES)
def test_entropy_within_margin_of_percentile_and_mse(scores, model_key, grid):
    row = scores[model_key, grid]
    acc, sqnr = row["entropy"]
    assert sqnr >= min(row["percentile"][1], row["mse"][1]) - 1.5, row
    assert acc >= min(row["percentile"][0], row["mse"][0]) - 1.0, row


def _issue_net() -> nn.Module:
    """The issue's network: Conv -> ReLU6 -> Conv -> ReLU -> Conv, random weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1)).eval()


def test_random_conv_net_of_the_issue():
    """Measured before the fix: entropy 12.4 dB (ranges 0.99 and 0.25 of the 2nd and 3rd convs,
    the first KL candidates) where max / percentile / MSE give 39.0-39.3 dB; after: 39.5 dB."""
    net = _issue_net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    test = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = net(test)
    amax = {}
    for method in METHODS:
        sim = _calibrated(net, quanta.preset("static_int8"), batches, method)
        with torch.no_grad():
            assert _sqnr_db(ref, sim(test)) > 36.0, method
        amax[method] = [float(sim[i].input_quantizer.amax) for i in (2, 4)]
    for ours, reference in zip(amax["entropy"], amax["mse"]):  # no collapse to the first candidates
        assert 0.7 * reference < ours <= 1.1 * reference, amax


@pytest.mark.parametrize("method", METHODS)
def test_merged_calibrators_give_the_ranges_of_all_the_data(trained_cnn, digits_data, method):
    """Two workers calibrate on halves of the data; their calibrators' states (what a
    ``torch.distributed`` gather carries) merged into one give the ranges of one calibration on
    all of it (histogram methods: exactly; moving average: the mean of the same batch extremes)."""
    batches = digits_data.calib_batches(4, 64)
    config = quanta.preset("static_int8")
    whole = _calibrated(trained_cnn, config, batches, method)
    first, second = _calibrated(trained_cnn, config, batches[:3], method), _calibrated(trained_cnn, config, batches[3:], method)
    others = dict(second.named_modules())
    checked = 0
    for name, q in first.named_modules():
        if isinstance(q, quanta.TensorQuantizer) and q.calibrator is not None:
            received = copy.deepcopy(q.calibrator)
            received.load_state_dict(others[name].calibrator.state_dict())
            q.calibrator.merge(received)
            q.load_calib_amax(method)
            expected = dict(whole.named_modules())[name]
            assert torch.equal(q.amax, expected.amax), (name, q.amax, expected.amax)
            assert (q.amin is None) == (expected.amin is None)
            if q.amin is not None:
                assert torch.equal(q.amin, expected.amin), name
            checked += 1
    assert checked >= 4
    with torch.no_grad():
        assert torch.equal(first(digits_data.x_test), whole(digits_data.x_test))
