"""BatchNorm folding: the float function is unchanged, the BatchNorms are gone, train mode refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta import QuantConfig
from quanta.demo import accuracy
from quanta.nn import TensorQuantizer


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_prepare_with_fold_bn_keeps_the_float_output_and_removes_batchnorms(trained_cnn, digits_data):
    assert _has_bn(trained_cnn)
    model = quanta.prepare(trained_cnn, QuantConfig(fold_bn=True))
    assert not _has_bn(model)
    assert _has_bn(trained_cnn)  # folded in the copy only
    assert sum(isinstance(m, nn.Identity) for m in model.modules()) == 3
    for q in model.modules():
        if isinstance(q, TensorQuantizer):
            q.disable()
    x = digits_data.x_test
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained_cnn(x), atol=1e-5, rtol=0)
    # the folded weights really differ from the unfolded ones (the BN scale went into them)
    assert not torch.equal(model.features[0].weight, trained_cnn.features[0].weight)


def test_folded_int8_model_keeps_accuracy(trained_cnn, digits_data):
    model = quanta.prepare(trained_cnn, QuantConfig(fold_bn=True))
    quanta.calibrate(model, digits_data.calib_batches(4, 64), progress=False)
    float_acc = accuracy(trained_cnn, digits_data.x_test, digits_data.y_test)
    assert accuracy(model, digits_data.x_test, digits_data.y_test) >= float_acc - 1.0


def test_fold_bn_in_train_mode_raises(trained_cnn):
    model = copy.deepcopy(trained_cnn).train()
    with pytest.raises(ValueError, match="eval mode"):
        quanta.prepare(model, QuantConfig(fold_bn=True))
    with pytest.raises(ValueError, match="eval mode"):
        quanta.fold_batchnorm(model)
    assert _has_bn(model)


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it): folding falls back to Sequentials."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.side = nn.Conv2d(2, 4, 3)
        self.side_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.side_bn(self.side(x))


def _randomize_bn(model: nn.Module) -> None:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_fold_batchnorm_falls_back_to_sequential_adjacency():
    model = Untraceable().eval()
    _randomize_bn(model)
    x = torch.rand(2, 2, 6, 6)
    expected = model(x)
    pairs = quanta.fold_batchnorm(model)
    assert pairs == [("body.0", "body.1")]  # the pair outside a Sequential is left alone
    assert isinstance(model.body[1], nn.Identity) and isinstance(model.side_bn, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make,x_shape", [
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), (6, 5)),
    (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 5, 5)),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)), (2, 3, 7)),
], ids=["linear", "conv-transpose", "conv-without-bias"])
def test_fold_batchnorm_layer_kinds(make, x_shape):
    model = make().eval()
    _randomize_bn(model)
    x = torch.rand(x_shape)
    expected = model(x)
    assert quanta.fold_batchnorm(model) == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_a_conv_feeding_two_consumers_is_not_folded():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Fork().eval()
    _randomize_bn(model)
    x = torch.rand(1, 2, 3, 3)
    expected = model(x)
    assert quanta.fold_batchnorm(model) == []
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
