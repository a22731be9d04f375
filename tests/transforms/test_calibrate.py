"""calibrate: the data forms it accepts, num_batches, methods, progress bar, restored state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quanta
from quanta.nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer


class KwNet(nn.Module):
    """Takes keyword arguments, so that dict batches can feed it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(x * scale)


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, generator=g) * (i + 1) for i in range(n)]


def _amax(model: nn.Module) -> float:
    return float(model.fc.input_quantizer.amax)


XS = _batches()
TRUE_AMAX = max(float(x.abs().max()) for x in XS)
FORMS = {
    "dataloader-x-y": (lambda: DataLoader(TensorDataset(torch.cat(XS), torch.zeros(24)), batch_size=8), {}, 1.0),
    "list-of-tensors": (lambda: list(XS), {}, 1.0),
    "dicts-as-kwargs": (lambda: [{"x": x, "scale": 2.0} for x in XS], {}, 2.0),
    "forward-fn": (lambda: [("id", x) for x in XS], {"forward_fn": lambda m, b: m(b[1])}, 1.0),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_accepts_each_data_form(form):
    make_data, kwargs, scale = FORMS[form]
    model = quanta.prepare(KwNet())
    quanta.calibrate(model, make_data(), progress=False, **kwargs)
    assert _amax(model) == pytest.approx(scale * TRUE_AMAX, rel=1e-6)
    assert model._quanta_calibration["batches"] == 3


def test_num_batches_is_honoured_and_no_extra_batch_is_pulled():
    pulled = []

    def stream():
        for i, x in enumerate(_batches(5)):
            pulled.append(i)
            yield x * (1000 if i >= 2 else 1)  # later batches would blow up the range

    calls = []
    model = quanta.prepare(KwNet())
    quanta.calibrate(model, stream(), num_batches=2, progress=False,
                     forward_fn=lambda m, b: calls.append(1) or m(b))
    assert len(calls) == 2 and pulled == [0, 1]
    assert model._quanta_calibration["batches"] == 2
    assert _amax(model) == pytest.approx(max(float(x.abs().max()) for x in _batches(2)), rel=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_num_batches_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_batches"):
        quanta.calibrate(quanta.prepare(KwNet()), XS, num_batches=bad, progress=False)


def _outlier_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(256, 16, generator=g) for _ in range(4)]
    data[1][3, 5] = 60.0  # one outlier among 16k values
    return data


# MSE keeps a lone outlier at 8 bits (clipping 60 to a costs (60 - a)² > the rounding error
# of 16k values at scale 60/127), so its case quantizes the activations to 4 bits.
@pytest.mark.parametrize("method,bits", [("percentile", 8), ("entropy", 8), ("mse", 4)],
                         ids=["percentile-int8", "entropy-int8", "mse-int4"])
def test_histogram_methods_give_tighter_ranges_than_max_with_outliers(method, bits):
    data = _outlier_data()
    cfg = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=bits)))
    ref = quanta.prepare(nn.Sequential(nn.Linear(16, 4)), cfg)
    quanta.calibrate(ref, data, method="max", progress=False)
    assert float(ref[0].input_quantizer.amax) == 60.0
    model = quanta.prepare(nn.Sequential(nn.Linear(16, 4)), cfg)
    quanta.calibrate(model, data, method=method, progress=False)
    amax = float(model[0].input_quantizer.amax)
    assert 1.0 < amax < 30.0, amax  # clips the outlier, keeps most of the bulk (|x| < 4.5)
    assert model._quanta_calibration["method"] == method
    x = torch.cat(data)
    with torch.no_grad():  # a smaller error on the bulk of the data than the max range gives
        bulk = x[x.abs() < 4]
        err = lambda m: float((m[0].input_quantizer(bulk) - bulk).pow(2).mean())
        assert err(model) < err(ref)


def test_method_kwargs_reach_the_range_computation():
    data = _outlier_data()
    ranges = {}
    for pct in (99.0, 99.999):
        model = quanta.prepare(nn.Sequential(nn.Linear(16, 4)))
        quanta.calibrate(model, data, method="percentile", percentile=pct, progress=False)
        ranges[pct] = float(model[0].input_quantizer.amax)
    assert ranges[99.0] < ranges[99.999]


def test_progress_bar_can_be_disabled(capsys):
    model = quanta.prepare(KwNet())
    quanta.calibrate(model, XS, progress=False)
    assert "calibrating" not in capsys.readouterr().err
    quanta.calibrate(model, XS, progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_restores_training_mode_and_leaves_quantizers_quantizing():
    model = quanta.prepare(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    model.train()
    seen_training = []
    model.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
    quanta.calibrate(model, XS, progress=False)
    assert seen_training == [False] * 3  # calibrated in eval mode (no dropout noise)
    assert model.training
    modes = {n: q.mode for n, q in model.named_modules() if isinstance(q, TensorQuantizer)}
    assert set(modes.values()) == {"quantize"}, modes
    assert model[0].weight_quantizer.amax is None  # weights follow the tensor, not data
    x = XS[0]
    assert not torch.equal(model[0].input_quantizer(x), x)  # quantizes now


def test_warns_about_quantizers_that_saw_no_data():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = quanta.prepare(Branchy())
    with pytest.warns(UserWarning, match=r"saw no data.*unused\.input_quantizer"):
        quanta.calibrate(model, XS, progress=False)
    assert model.used.input_quantizer.amax is not None and model.unused.input_quantizer.amax is None


def test_recalibration_starts_from_fresh_statistics():
    model = quanta.prepare(KwNet())
    quanta.calibrate(model, [XS[2]], progress=False)
    big = _amax(model)
    quanta.calibrate(model, [XS[0]], progress=False)
    assert _amax(model) == pytest.approx(float(XS[0].abs().max()), rel=1e-6) and _amax(model) < big
