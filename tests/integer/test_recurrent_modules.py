"""Dynamic int8 recurrent modules against their simulation; a trained LSTM keeps its accuracy.

Bound vs the simulation: the integer path computes ``acc * (s_x * s_w) + b`` where the
simulation computes ``F.linear(fq(x), fq(W), b)`` in float32, so they differ by float
rounding (~1e-7) and, rarely, by one requantized hidden-state code: max |diff| <= 2e-2 and
mean <= 1e-3 (measured: <= 2e-7 on these cases).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor
from quanta.integer.recurrent import (
    DynamicInt8GRU,
    DynamicInt8GRUCell,
    DynamicInt8LSTM,
    DynamicInt8LSTMCell,
    DynamicInt8RNN,
    DynamicInt8RNNCell,
)

SYM = QuantDescriptor(dynamic=True)  # signed symmetric int8 -> native, else the int_mm kernel
ASYM = QuantDescriptor(dynamic=True, unsigned=True, symmetric=False)  # fbgemm's grid -> native, else fbgemm
CFG = {"sym": QuantConfig(default=LayerQuantConfig(input=SYM)), "asym": QuantConfig(default=LayerQuantConfig(input=ASYM))}


def _fallback_impl(act: str) -> str:
    """The grid's fast PyTorch path: int_mm for signed symmetric codes; fbgemm for unsigned
    asymmetric 8-bit ones, except where its u8×s8 pair sums saturate (no VNNI): the reference."""
    from quanta.kernels.recurrent import FBGEMM_SATURATION
    if act == "sym":
        return "int_mm"
    return "fbgemm" if FBGEMM_SATURATION.exact() else "reference"


class _Expected(dict):
    """The kernel a module records for a few sequences: the C++ loop where it is available (any
    grid), else the grid's fast PyTorch path."""

    def __missing__(self, act: str) -> str:
        from quanta.kernels.recurrent import dynamic_int8_rnn
        return "native" if "native" in dynamic_int8_rnn.available_impls() else _fallback_impl(act)


EXPECTED_IMPL = _Expected()

SEQ = [
    ("lstm", lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True), DynamicInt8LSTM),
    ("gru", lambda: nn.GRU(5, 33, num_layers=2), DynamicInt8GRU),
    ("rnn-relu", lambda: nn.RNN(5, 7, nonlinearity="relu", bias=False), DynamicInt8RNN),
]
CELLS = [
    ("lstmcell", lambda: nn.LSTMCell(5, 33), DynamicInt8LSTMCell),
    ("grucell", lambda: nn.GRUCell(5, 7, bias=False), DynamicInt8GRUCell),
    ("rnncell", lambda: nn.RNNCell(5, 7), DynamicInt8RNNCell),
]


def _flat(out):
    items = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([t.flatten() for item in items for t in (item if isinstance(item, tuple) else (item,))])


def _close_to_sim(a, b):
    d = (_flat(a) - _flat(b)).abs()
    assert float(d.max()) <= 2e-2 and float(d.mean()) <= 1e-3, (float(d.max()), float(d.mean()))


def _lower(make, cls, act):
    torch.manual_seed(0)
    sim = quanta.prepare(make().eval(), CFG[act])
    return sim, cls.from_simulated(sim)


@pytest.mark.parametrize("act", ["sym", "asym"])
@pytest.mark.parametrize("name,make,cls", SEQ + CELLS, ids=[c[0] for c in SEQ + CELLS])
def test_matches_simulation_and_round_trips(name, make, cls, act):
    sim, im = _lower(make, cls, act)
    is_cell = "Cell" in cls.__name__
    gen = torch.Generator().manual_seed(1)
    for shape in ([(3, 5)] if is_cell else [(3, 6, 5), (1, 4, 5)]) + [(5,) if is_cell else (6, 5)]:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            _close_to_sim(sim(x), im(x))
    assert im.kernel_counts[EXPECTED_IMPL[act]] == len(im.kernel_counts and list(im.kernel_counts.elements()))
    # a fresh module from the constructor alone, loaded from the state dict: identical outputs
    kwargs = {"act_spec": im.act_spec}
    if hasattr(im, "nonlinearity"):
        kwargs["nonlinearity"] = im.nonlinearity
    if is_cell:
        fresh = cls(im.input_size, im.hidden_size, im.bias, **kwargs)
    else:
        fresh = cls(im.input_size, im.hidden_size, im.num_layers, im.bias, im.batch_first, im.bidirectional, **kwargs)
    fresh.load_state_dict(im.state_dict())
    x = torch.randn((2, 5) if is_cell else (2, 4, 5), generator=gen)
    assert torch.equal(_flat(fresh(x)), _flat(im(x)))
    assert cls.__name__ in repr(im) and "int8" in repr(im)


def test_initial_states_and_unbatched():
    sim, im = _lower(lambda: nn.LSTM(4, 7, num_layers=2, bidirectional=True), DynamicInt8LSTM, "sym")
    h = (torch.randn(4, 3, 7) * 0.5, torch.randn(4, 3, 7) * 0.5)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        _close_to_sim(sim(x, h), im(x, h))
        out, (hn, cn) = im(x[:, 0], (h[0][:, 0], h[1][:, 0]))
        assert out.shape == (5, 14) and hn.shape == (4, 7) and cn.shape == (4, 7)
        _close_to_sim(sim(x[:, 0], (h[0][:, 0], h[1][:, 0])), (out, (hn, cn)))


def test_storage_is_a_quarter_of_fp32():
    sim, im = _lower(lambda: nn.LSTM(64, 128, num_layers=2), DynamicInt8LSTM, "sym")
    fp32 = sum(p.numel() * 4 for p in sim.parameters())
    assert im.storage_bytes() <= 0.27 * fp32


def test_accepts_explains_refusals():
    static = quanta.prepare(nn.LSTM(3, 5).eval(), QuantConfig())
    assert "static activation" in DynamicInt8LSTM.accepts(static)
    with pytest.raises(ValueError, match="static activation"):
        DynamicInt8LSTM.from_simulated(static)
    proj = quanta.prepare(nn.LSTM(3, 5, proj_size=2).eval(), CFG["sym"])
    assert "proj_size" in DynamicInt8LSTM.accepts(proj)
    gru = quanta.prepare(nn.GRU(3, 5).eval(), CFG["sym"])
    assert "QuantLSTM" in DynamicInt8LSTM.accepts(gru)
    assert DynamicInt8GRU.accepts(gru) is None
    no_w = quanta.prepare(nn.GRUCell(3, 5).eval(), QuantConfig(default=LayerQuantConfig(input=SYM, weight=None)))
    assert "not quantized" in DynamicInt8GRUCell.accepts(no_w)


def test_bad_input_raises_clearly():
    _, im = _lower(lambda: nn.GRU(4, 6, batch_first=True), DynamicInt8GRU, "sym")
    with pytest.raises(TypeError, match="PackedSequence"):
        im(nn.utils.rnn.pack_sequence([torch.randn(3, 4)]))
    with pytest.raises(ValueError, match="4 features"):
        im(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        im(torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        im(torch.randn(2, 3, 4).double())
    with pytest.raises(ValueError, match="hidden state of shape"):
        im(torch.randn(2, 3, 4), torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match="act_spec|per tensor|static"):
        DynamicInt8GRU(4, 6, act_spec=quanta.QuantSpec(bits=8))


@pytest.fixture(scope="module")
def lstm_model():
    x, y = quanta.demo.sine_sequences(n=2000, length=24, seed=0)
    torch.manual_seed(0)
    model = quanta.demo.train_classifier(quanta.demo.SequenceLSTM(), x[:1500], y[:1500], seed=0, epochs=6).eval()
    return model, x[1500:], y[1500:]


@pytest.mark.parametrize("act", ["sym", "asym"])
def test_trained_lstm_keeps_accuracy(lstm_model, act):
    model, x, y = lstm_model
    with torch.no_grad():
        acc_float = float((model(x).argmax(1) == y).float().mean())
    sim = quanta.prepare(model, QuantConfig(default=CFG[act].default, rules={"lstm": CFG[act].default, "*": None}))
    lowered = copy.deepcopy(model)
    lowered.lstm = DynamicInt8LSTM.from_simulated(sim.lstm)
    with torch.no_grad():
        acc_int = float((lowered(x).argmax(1) == y).float().mean())
        acc_sim = float((sim(x).argmax(1) == y).float().mean())
    assert acc_float > 0.85
    assert acc_int >= acc_float - 0.01, (acc_float, acc_sim, acc_int)
    assert abs(acc_int - acc_sim) <= 0.004  # at most 2 of 500 predictions differ
    # 500 sequences: the native loop takes any batch without VNNI; with VNNI they are past its limit
    from quanta.kernels.recurrent_native import native_max_batch
    many = EXPECTED_IMPL[act] if native_max_batch() is None else _fallback_impl(act)
    assert lowered.lstm.kernel_counts[many] == 1, lowered.lstm.kernel_counts
