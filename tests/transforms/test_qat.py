"""Quantization-aware training on the trained digits CNN: 4-bit weights and activations.

Post-training 4-bit (per-tensor weights, max-calibrated unsigned activations) loses about 11
points; one epoch of QAT (22 steps, about 2 s) recovers it; learned (LSQ) ranges move and beat
fixed ones; the converted integer model matches the trained simulation.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta import demo
from quanta.nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer
from quanta.nn.modules.conv_bn import QATConvBn

W4A4 = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=4, unsigned=True),
                                                   weight=QuantDescriptor(num_bits=4)), fold_bn=True)


def _train(model, data, epochs=1, autocast=False, steps=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    model.train()
    done = 0
    for _ in range(epochs if steps is None else 1 + steps // 20):
        perm = torch.randperm(len(data.y_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            done += 1
            if steps is not None and done >= steps:
                return model.eval()
        sched.step()
    return model.eval()


def _test_loss(model, data) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model.eval()(data.x_test), data.y_test))


def _qat(trained_cnn, data, **kwargs):
    model = copy.deepcopy(trained_cnn).train()
    config = quanta.QATConfig(config=W4A4, freeze_bn_step=30, **kwargs)
    return quanta.prepare_qat(model, config, data=data.calib_batches(8), progress=False)


@pytest.fixture(scope="module")
def ptq_accuracy(trained_cnn, digits_data) -> float:
    ptq = quanta.prepare(trained_cnn, W4A4)
    quanta.calibrate(ptq, digits_data.calib_batches(8), progress=False)
    return demo.accuracy(ptq, digits_data.x_test, digits_data.y_test)


def test_qat_recovers_the_4bit_loss_and_learned_ranges_beat_fixed(trained_cnn, digits_data, ptq_accuracy):
    fp32 = demo.accuracy(trained_cnn, digits_data.x_test, digits_data.y_test)
    assert fp32 - ptq_accuracy >= 5, (fp32, ptq_accuracy)  # the task really needs QAT
    learned = _qat(trained_cnn, digits_data)
    start = {n: p.detach().clone() for n, p in learned.named_parameters() if n.endswith("amax")}
    assert len(start) >= 8  # input and weight ranges of every conv and the head
    _train(learned, digits_data)
    fixed = _train(_qat(trained_cnn, digits_data, learn_ranges=False), digits_data)
    acc_learned = demo.accuracy(learned, digits_data.x_test, digits_data.y_test)
    acc_fixed = demo.accuracy(fixed, digits_data.x_test, digits_data.y_test)
    assert acc_learned - ptq_accuracy >= (fp32 - ptq_accuracy) / 2, (fp32, ptq_accuracy, acc_learned)
    moved = [n for n, p in learned.named_parameters() if n in start and not torch.equal(p.detach(), start[n])]
    assert len(moved) == len(start)
    assert acc_learned >= acc_fixed and _test_loss(learned, digits_data) < _test_loss(fixed, digits_data)
    assert not any(n.endswith("amax") for n, _ in fixed.named_parameters())


def test_converted_model_matches_the_trained_simulation(trained_cnn, digits_data):
    model = _train(_qat(trained_cnn, digits_data), digits_data, steps=20)
    quanta.finalize_qat(model)
    assert not any(isinstance(m, (QATConvBn, nn.BatchNorm2d)) for m in model.modules())
    x = digits_data.x_test[:128]
    with torch.no_grad():
        simulated = model(x)
        integer = quanta.convert(copy.deepcopy(model))(x)
    head_step = float(model.head.input_quantizer.qparams()[0]) * float(model.head.weight_quantizer.qparams()[0])
    assert (integer - simulated).abs().max() <= head_step  # within one step of the head's integer grid
    assert (integer.argmax(1) == simulated.argmax(1)).float().mean() >= 0.99


def test_batchnorm_uses_batch_statistics_then_freezes_then_folds(trained_cnn, digits_data):
    model = _qat(trained_cnn, digits_data)
    fused = [m for m in model.modules() if isinstance(m, QATConvBn)]
    assert len(fused) == 3
    bn = fused[0].bn
    before = bn.running_mean.clone()
    _train(model, digits_data, steps=5)
    assert not torch.equal(bn.running_mean, before)  # statistics still update before freeze_bn_step
    _train(model, digits_data, steps=25)
    frozen = bn.running_mean.clone()
    _train(model, digits_data, steps=3)
    assert torch.equal(bn.running_mean, frozen) and not bn.training
    x = digits_data.x_test[:64]
    with torch.no_grad():
        before_fold = model.eval()(x)
        after_fold = quanta.finalize_qat(model)(x)
    torch.testing.assert_close(after_fold, before_fold, atol=1e-4, rtol=1e-4)


def test_autocast_bf16_and_freezing_ranges_on_a_schedule(trained_cnn, digits_data):
    model = _qat(trained_cnn, digits_data, freeze_ranges_step=4)
    amax = dict(model.named_parameters())["features.3.conv.input_quantizer.amax"]
    _train(model, digits_data, steps=4, autocast=True)
    assert amax.requires_grad
    moved = amax.detach().clone()
    _train(model, digits_data, steps=3, autocast=True)
    assert not amax.requires_grad and torch.equal(amax.detach(), moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert demo.accuracy(model, digits_data.x_test, digits_data.y_test) > 80


def test_collapsed_learned_range_is_clamped_and_reported_not_nan(trained_cnn, digits_data):
    model = _qat(trained_cnn, digits_data, min_amax=1e-4)
    q = model.get_submodule("features.3.conv.input_quantizer")
    with torch.no_grad():
        q.amax.zero_()
    model.train()
    with pytest.warns(UserWarning, match=r"collapsed below min_amax=0.0001 and were clamped: features.3.conv.input_quantizer"):
        loss = model(digits_data.x_train[:32]).square().mean()
    loss.backward()
    assert float(q.amax.detach()) == pytest.approx(1e-4)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_input(trained_cnn, digits_data):
    with pytest.warns(UserWarning, match="is in eval mode"):
        quanta.prepare_qat(trained_cnn, quanta.QATConfig(config=W4A4), data=digits_data.calib_batches(2),
                           progress=False)
    assert not trained_cnn.training  # the user's model is untouched (a copy was prepared)
    with pytest.raises(ValueError, match="activation range.*pass data="):
        quanta.prepare_qat(copy.deepcopy(trained_cnn).train(), W4A4)
    with pytest.raises(ValueError, match="freeze_bn_step"):
        quanta.QATConfig(freeze_bn_step=-1)
    with pytest.raises(ValueError, match="not prepared with quanta.prepare_qat"):
        quanta.finalize_qat(quanta.prepare(trained_cnn, W4A4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = quanta.prepare_qat(copy.deepcopy(trained_cnn).train(), "static_int8",
                                   data=digits_data.calib_batches(2), progress=False)
    learned = [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and isinstance(m.amax, nn.Parameter)]
    assert "features.0.conv.weight_quantizer" in learned  # symmetric weights learn; affine uint8 inputs stay calibrated
    assert "features.0.conv.input_quantizer" not in learned
