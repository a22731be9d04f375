"""TensorQuantizer: modes, ranges as state, repr, fixed / dynamic / learned ranges, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.core import choose_qparams, compute_range, fake_quantize, quantize
from quanta.nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer


def _reference(x: torch.Tensor, spec) -> torch.Tensor:
    """Fake-quantize ``x`` with its own range, using quanta.core only."""
    lo, hi = compute_range(x, spec)
    return fake_quantize(x, *choose_qparams(lo, hi, spec), spec)


def _calibrated(desc: QuantDescriptor, data: torch.Tensor) -> TensorQuantizer:
    q = TensorQuantizer(desc)
    q.disable_quant()
    q.enable_calib()
    q(data)
    q.disable_calib()
    q.enable_quant()
    q.load_calib_amax()
    return q


# ---------------------------------------------------------------------------- modes
def test_calibrate_mode_passes_data_through_and_collects():
    x = torch.randn(16, 8)
    q = TensorQuantizer()
    q.disable_quant()
    q.enable_calib()
    assert q.mode == "calibrate"
    out = q(x)
    assert torch.equal(out, x)
    assert q.calibrator.num_batches == 1
    assert q.amax is None  # ranges are only loaded by load_calib_amax


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantize_mode_equals_core_fake_quantize(bits, symmetric):
    x = torch.randn(32, 16) * 3 + (0 if symmetric else 1.5)
    q = _calibrated(QuantDescriptor(num_bits=bits, symmetric=symmetric), x)
    assert q.mode == "quantize"
    out = q(x)
    torch.testing.assert_close(out, _reference(x, q.spec), atol=0, rtol=0)
    assert not torch.equal(out, x)
    # on the grid: at most 2**bits distinct values
    assert out.unique().numel() <= 2 ** bits


def test_disabled_is_identity_and_enable_restores():
    x = torch.randn(4, 4)
    q = TensorQuantizer(QuantDescriptor(amax=1.0, num_bits=2))
    q.disable()
    assert q.mode == "disabled" and not q.is_enabled
    assert q(x) is x
    q.enable()
    assert q.mode == "quantize"
    assert not torch.equal(q(x), x)


def test_fake_quant_false_returns_integer_codes():
    x = torch.linspace(-2, 2, 41)
    q = TensorQuantizer(QuantDescriptor(amax=2.0, fake_quant=False))
    codes = q(x)
    assert codes.dtype == torch.int8
    assert int(codes.min()) == -127 and int(codes.max()) == 127  # amax maps to qmax
    scale, zp = q.qparams()
    torch.testing.assert_close(codes, quantize(x, scale, zp, q.spec), atol=0, rtol=0)


# ---------------------------------------------------------------------------- ranges
def test_fixed_amax_needs_no_calibration_and_clips():
    q = TensorQuantizer(QuantDescriptor(amax=2.0))
    assert not q.needs_calibration
    x = torch.tensor([-5.0, -2.0, 0.0, 1.0, 2.0, 7.0])
    out = q(x)
    scale, _ = q.qparams()
    torch.testing.assert_close(scale, torch.tensor(2.0 / 127), atol=0, rtol=0)
    assert out[-1] == 2.0 and out[0] == -128 * scale  # clipped to the grid [-128, 127] · scale


def test_fixed_amax_is_not_overwritten_by_calibration():
    fixed = LayerQuantConfig(input=QuantDescriptor(amax=0.5))
    model = quanta.prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                           quanta.QuantConfig(rules={"0": fixed}))
    quanta.calibrate(model, [torch.randn(8, 4) * 10], progress=False)
    assert float(model[0].input_quantizer.amax) == 0.5
    assert model[1].input_quantizer.amax is not None  # the other one was calibrated


def test_dynamic_per_token_scales_each_row_independently():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    x[0, 0] *= 100  # one loud token
    q = TensorQuantizer(QuantDescriptor(per_token=True))
    assert q.spec.dynamic and not q.needs_calibration
    out = q(x)
    torch.testing.assert_close(out, _reference(x, q.spec), atol=0, rtol=0)
    # every row keeps its own maximum exactly (amax maps to qmax), quiet rows are not crushed
    torch.testing.assert_close(out.abs().amax(-1), x.abs().amax(-1), atol=1e-6, rtol=1e-6)
    quiet = (out[1:] - x[1:]).abs().max() / x[1:].abs().max()
    assert quiet < 1 / 127
    # a per-tensor quantizer would crush the quiet rows: the test would notice a swap
    per_tensor = _reference(x, QuantDescriptor().to_spec())
    assert (per_tensor[1:] - x[1:]).abs().max() / x[1:].abs().max() > 5 * quiet


def test_ranges_are_buffers_in_state_dict_and_reload(trained_cnn, digits_data):
    cfg = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(symmetric=False)))
    model = quanta.prepare(trained_cnn, cfg)
    quanta.calibrate(model, digits_data.calib_batches(), progress=False)
    sd = model.state_dict()
    assert "features.0.input_quantizer.amax" in sd and "features.0.input_quantizer.amin" in sd
    fresh = quanta.prepare(trained_cnn, cfg)
    assert fresh.features[0].input_quantizer.amax is None
    fresh.load_state_dict(sd)
    x = digits_data.x_test[:64]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    assert not torch.equal(model(x), trained_cnn(x))


def test_repr_is_one_line_with_bits_axis_and_range():
    q = TensorQuantizer(QuantDescriptor(per_channel=True, narrow_range=True), axis=0)
    q.set_range(None, torch.tensor([0.5, 2.0, 1.0]))
    text = repr(q)
    assert "\n" not in text
    assert "int8" in text and "axis=0" in text and "amax=[0.5, 2](3)" in text
    assert "uncalibrated" in repr(TensorQuantizer(QuantDescriptor(num_bits=4)))
    assert "int4" in repr(TensorQuantizer(QuantDescriptor(num_bits=4)))


# ---------------------------------------------------------------------------- errors
def test_uncalibrated_static_quantizer_raises_naming_itself():
    with pytest.raises(RuntimeError, match="'act_in'.*no range"):
        TensorQuantizer(QuantDescriptor(name="act_in"))(torch.randn(3))
    model = quanta.prepare(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match=r"'0\.input_quantizer'.*calibrate"):
        model(torch.randn(3, 4))


def test_unknown_calibration_method_raises():
    q = TensorQuantizer()
    with pytest.raises(ValueError, match="unknown calibration method"):
        q.enable_calib("median")


# ---------------------------------------------------------------------------- learned ranges
def test_learn_amax_gets_gradients_on_input_and_weight_ranges():
    torch.manual_seed(0)
    cfg = quanta.QuantConfig(default=LayerQuantConfig(
        input=QuantDescriptor(amax=1.0, learn_amax=True),
        weight=QuantDescriptor(per_channel=True, learn_amax=True)))
    model = quanta.prepare(nn.Sequential(nn.Linear(8, 4)), cfg)
    layer = model[0]
    assert isinstance(layer.input_quantizer.amax, nn.Parameter)
    assert layer.weight_quantizer.amax.shape == (4,)
    names = {n for n, _ in model.named_parameters()}
    assert {"0.input_quantizer.amax", "0.weight_quantizer.amax"} <= names
    x = torch.randn(64, 8) * 2  # many values beyond amax=1: the range should grow
    model(x).pow(2).sum().backward()
    g_in, g_w = layer.input_quantizer.amax.grad, layer.weight_quantizer.amax.grad
    assert g_in is not None and float(g_in.abs()) > 0
    assert g_w is not None and bool((g_w != 0).all())
    opt = torch.optim.SGD([layer.input_quantizer.amax], lr=1.0)
    before = float(layer.input_quantizer.amax.detach())
    opt.step()
    assert float(layer.input_quantizer.amax.detach()) != before
