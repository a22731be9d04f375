"""prepare: exact float behaviour with quantizers off, the float model left alone, QAT's base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.nn import LayerQuantConfig, QuantDescriptor, QuantModule, TensorQuantizer

MODELS = {
    # fixture name of the trained model, fixture name of its data
    "cnn": ("trained_cnn", "digits_data"),
    "lstm": ("trained_lstm", "sequence_data"),
    "transformer": ("trained_transformer", "token_data"),
}


def _model_and_data(request, kind):
    model_name, data_name = MODELS[kind]
    return request.getfixturevalue(model_name), request.getfixturevalue(data_name)


def _quantizers(model: nn.Module) -> list[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[type]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()])


def _assert_same(model: nn.Module, snap) -> None:
    state, types = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_all_quantizers_disabled_gives_the_float_output_exactly(request, kind):
    model, data = _model_and_data(request, kind)
    prepared = quanta.prepare(model)
    quantized_layers = [m for m in prepared.modules() if isinstance(m, QuantModule)]
    assert len(quantized_layers) >= 2 and len(_quantizers(prepared)) >= 4
    quanta.calibrate(prepared, data.calib_batches(2, 64), progress=False)
    x = data.x_test[:128]
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(prepared(x), expected)  # quantization is on after calibration
        for q in _quantizers(prepared):
            q.disable()
        torch.testing.assert_close(prepared(x), expected, atol=0, rtol=0)
    # with gradients enabled too (torch takes other code paths there)
    torch.testing.assert_close(prepared(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_prepare_and_calibrate_never_modify_the_float_model(request, kind):
    trained, data = _model_and_data(request, kind)
    model = copy.deepcopy(trained)
    snap = _snapshot(model)
    prepared = quanta.prepare(model)
    quanta.calibrate(prepared, data.calib_batches(2, 32), progress=False)
    with torch.no_grad():
        for p in prepared.parameters():  # even changing the prepared copy's weights
            p.add_(1.0)
    _assert_same(model, snap)
    assert not any(isinstance(m, (QuantModule, TensorQuantizer)) for m in model.modules())


def test_inplace_prepare_modifies_and_returns_the_model(trained_cnn, digits_data):
    model = copy.deepcopy(trained_cnn)
    snap = _snapshot(model)
    prepared = quanta.prepare(model, inplace=True)
    assert prepared is model
    assert isinstance(model.features[0], QuantModule) and isinstance(model.head, QuantModule)
    with pytest.raises(AssertionError):
        _assert_same(model, snap)
    quanta.calibrate(model, digits_data.calib_batches(2, 32), progress=False)
    assert model.features[0].input_quantizer.amax is not None


def test_prepared_model_shares_no_storage_with_the_float_model(trained_cnn):
    prepared = quanta.prepare(trained_cnn)
    float_ptrs = {p.data_ptr() for p in trained_cnn.parameters()}
    assert not float_ptrs & {p.data_ptr() for p in prepared.parameters()}
    # and a float state_dict loads into the prepared model unchanged (same parameter names)
    missing, unexpected = prepared.load_state_dict(trained_cnn.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith(("amax", "amin"))]


def test_qat_adam_steps_reduce_the_loss_and_reach_every_weight(trained_cnn, digits_data):
    # 4-bit per-tensor: far enough from float that the fine-tuning has something to recover
    cfg = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=4),
                                                      weight=QuantDescriptor(num_bits=4)))
    model = quanta.prepare(trained_cnn, cfg)
    quanta.calibrate(model, digits_data.calib_batches(4, 64), progress=False)
    model.eval()  # QAT fine-tuning with frozen BatchNorm statistics
    x, y = digits_data.x_train[:256], digits_data.y_train[:256]
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)

    def loss_now() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    before = loss_now()
    for step in range(15):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        opt.step()
    after = loss_now()
    assert after < 0.5 * before, (before, after)  # measured: 0.34 → 0.05


def test_verbose_prints_the_coverage_report(capsys):
    quanta.prepare(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), verbose=True)
    out = capsys.readouterr().out
    assert "QuantLinear" in out and "1 quantized" in out and "Tanh" in out


def test_prepare_rejects_non_modules_and_bad_configs():
    with pytest.raises(TypeError, match="nn.Module"):
        quanta.prepare(lambda x: x)
    with pytest.raises(TypeError, match="QuantConfig"):
        quanta.prepare(nn.Linear(2, 2), config={"default": None})
