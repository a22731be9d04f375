"""Quantized LSTM / GRU / RNN and their cells: structure, float equivalence, quantization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from quanta.core import fake_quantize
from quanta.nn.descriptor import QuantDescriptor
from quanta.nn.modules.base import LayerQuantConfig
from quanta.nn.modules.rnn import (
    QuantGRU,
    QuantGRUCell,
    QuantLSTM,
    QuantLSTMCell,
    QuantRNN,
    QuantRNNCell,
)
from quanta.nn.tensor_quantizer import TensorQuantizer

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

SEQ = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU, nn.RNN: QuantRNN}
CELLS = {nn.LSTMCell: QuantLSTMCell, nn.GRUCell: QuantGRUCell, nn.RNNCell: QuantRNNCell}
QCLS = {**SEQ, **CELLS}
FIXED = LayerQuantConfig(input=QuantDescriptor(amax=3.0))  # no calibration needed
LOW_BITS = LayerQuantConfig(input=QuantDescriptor(num_bits=3), weight=QuantDescriptor(num_bits=3))

# (float class, kwargs) with readable ids; input_size 4, hidden 6 everywhere
SEQ_CASES = {
    "lstm": (nn.LSTM, {}),
    "lstm-2l-bidir-batchfirst": (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    "lstm-proj-2l-bidir": (nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
    "gru-2l-bidir-nobias": (nn.GRU, dict(num_layers=2, bidirectional=True, bias=False)),
    "gru-batchfirst": (nn.GRU, dict(batch_first=True)),
    "rnn-tanh-2l": (nn.RNN, dict(num_layers=2)),
    "rnn-relu-bidir": (nn.RNN, dict(nonlinearity="relu", bidirectional=True)),
}
CELL_CASES = {"lstmcell": (nn.LSTMCell, {}), "grucell": (nn.GRUCell, {"bias": False}),
              "rnncell-relu": (nn.RNNCell, {"nonlinearity": "relu"})}
ALL_CASES = {**SEQ_CASES, **CELL_CASES}


def build(case: str, config: LayerQuantConfig | None = None, seed: int = 0):
    cls, kw = ALL_CASES[case]
    torch.manual_seed(seed)
    f = cls(4, 6, **kw)
    return f, QCLS[cls].from_float(f, config)


def seq_input(f: nn.Module, t: int = 7, b: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(f, nn.RNNCellBase):
        return torch.randn(t, b, 4, generator=g)  # a sequence of steps for the cell loop
    x = torch.randn(t, b, 4, generator=g)
    return x.transpose(0, 1).contiguous() if f.batch_first else x


def run(m: nn.Module, x: torch.Tensor, hx=None):
    """Sequence modules: m(x, hx). Cells: loop over x's first axis; returns (stacked h, last state)."""
    if not isinstance(m, nn.RNNCellBase):
        return m(x, hx)
    outs = []
    for x_t in x:
        hx = m(x_t, hx)
        outs.append(hx[0] if isinstance(hx, tuple) else hx)
    return torch.stack(outs), hx


def initial_state(f: nn.Module, b: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    if isinstance(f, nn.RNNCellBase):
        h = torch.randn(b, f.hidden_size, generator=g)
        return (h, torch.randn(b, f.hidden_size, generator=g)) if isinstance(f, nn.LSTMCell) else h
    n = f.num_layers * (2 if f.bidirectional else 1)
    h = torch.randn(n, b, f.proj_size or f.hidden_size, generator=g)
    return (h, torch.randn(n, b, f.hidden_size, generator=g)) if isinstance(f, nn.LSTM) else h


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return [out.data]
    return [t for o in out for t in flat(o)]


def assert_close(a, b, atol: float) -> None:
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def activation_quantizers(m) -> list[TensorQuantizer]:
    return [q for kind, q in m.quantizers() if kind != "weight"]


def set_all(m, on: bool) -> None:
    for _, q in m.quantizers():
        q.enable() if on else q.disable()


def calibrate(m, x: torch.Tensor, batches: int = 3) -> None:
    acts = activation_quantizers(m)
    for q in acts:
        q.enable_calib()
        q.disable_quant()
    with torch.no_grad():
        for i in range(batches):
            run(m, x + 0.1 * i)
    for q in acts:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()


def cosine(a, b) -> float:
    return F.cosine_similarity(flat(a)[0].flatten(), flat(b)[0].flatten(), dim=0).item()


def rel_error(a, b) -> float:
    a, b = flat(a)[0], flat(b)[0]
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize("case", list(ALL_CASES))
def test_from_float_shares_parameters_and_state_dict(case):
    f, q = build(case)
    assert type(q).__name__ == "Quant" + type(f).__name__ and isinstance(q, type(f))
    assert q.float_type is type(f)
    for name, p in f.named_parameters():
        assert q._parameters[name] is p
    assert set(q.state_dict()) == set(f.state_dict())  # no ranges yet
    q.load_state_dict(f.state_dict())  # strict
    assert set(q.weight_names) == {n for n, _ in f.named_parameters() if n.startswith("weight")}
    assert q.input_quantizer is None or isinstance(f, nn.RNNCellBase)


def test_quantizer_kinds_and_constructor():
    q = QuantLSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    kinds = [k for k, _ in q.quantizers()]
    assert kinds == ["input[l0]", "hidden[l0]", "proj_input[l0]", "hidden[l0_reverse]", "proj_input[l0_reverse]",
                     "input[l1]", "hidden[l1]", "proj_input[l1]", "hidden[l1_reverse]",
                     "proj_input[l1_reverse]", "weight"]
    assert q.weight_names == ("weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "weight_ih_l0_reverse",
                              "weight_hh_l0_reverse", "weight_hr_l0_reverse", "weight_ih_l1", "weight_hh_l1",
                              "weight_hr_l1", "weight_ih_l1_reverse", "weight_hh_l1_reverse",
                              "weight_hr_l1_reverse")
    assert QuantGRU(4, 6).weight_names == ("weight_ih_l0", "weight_hh_l0")  # per instance
    assert [k for k, _ in QuantGRUCell(4, 6).quantizers()] == ["input", "hidden", "weight"]
    assert [k for k, _ in QuantRNN(4, 6, quant_desc_input=None).quantizers()] == ["weight"]


class FlipLSTM(nn.LSTM):
    """A user subclass whose forward reverses the sequence before the LSTM runs."""

    def forward(self, x, hx=None):
        return super().forward(x.flip(0), hx)


class DoubleCell(nn.GRUCell):
    def forward(self, x, hx=None):
        return super().forward(2 * x, hx)


@pytest.mark.parametrize("sub, base", [(FlipLSTM, nn.LSTM), (DoubleCell, nn.GRUCell)], ids=["lstm", "grucell"])
def test_user_subclass_keeps_its_forward(sub, base):
    torch.manual_seed(0)
    f = sub(4, 6)
    q = CELLS.get(base, SEQ.get(base)).from_float(f, FIXED)
    assert type(q).__name__ == "Quant" + sub.__name__ and isinstance(q, sub) and isinstance(q, QCLS[base])
    x = seq_input(f)
    set_all(q, False)
    assert_close(run(q, x), run(f, x), atol=0)  # float path, the subclass's forward
    set_all(q, True)
    plain_f = base(4, 6)
    plain_f.load_state_dict(f.state_dict())
    plain = QCLS[base].from_float(plain_f, FIXED)  # same weights and fixed ranges, no subclass forward
    assert type(plain) is QCLS[base]
    transformed = x.flip(0) if base is nn.LSTM else 2 * x
    assert_close(run(q, x), run(plain, transformed), atol=0)  # subclass forward, then quantized kernel
    assert (flat(run(q, x))[0] - flat(run(f, x))[0]).abs().max() > 0  # quantization did something


# ---------------------------------------------------------------------- float equivalence
@pytest.mark.parametrize("case", list(ALL_CASES))
def test_all_quantizers_disabled_is_float_exactly(case):
    f, q = build(case)
    set_all(q, False)
    x = seq_input(f)
    assert_close(run(q, x), run(f, x), atol=0)
    assert_close(run(q, x, initial_state(f)), run(f, x, initial_state(f)), atol=0)


@pytest.mark.parametrize("case", list(SEQ_CASES))
def test_unrolled_path_matches_float(case):
    f, q = build(case)
    set_all(q, False)
    q.force_unrolled = True
    x, hx = seq_input(f), initial_state(f)
    assert_close(q(x), f(x), atol=1e-5)
    assert_close(q(x, hx), f(x, hx), atol=1e-5)
    x1 = x[0] if f.batch_first else x[:, 0]  # unbatched
    hx1 = tuple(s[:, 0] for s in hx) if isinstance(hx, tuple) else hx[:, 0]
    assert_close(q(x1, hx1), f(x1, hx1), atol=1e-5)
    packed = pack_padded_sequence(x, torch.tensor([4, 7, 2]), batch_first=f.batch_first, enforce_sorted=False)
    out_q, out_f = q(packed, hx), f(packed, hx)
    assert type(out_q[0]) is type(out_f[0])
    assert torch.equal(out_q[0].batch_sizes, out_f[0].batch_sizes)
    assert_close(out_q, out_f, atol=1e-5)


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_python_step_matches_float(case):
    f, q = build(case)
    set_all(q, False)
    q.force_unrolled = True
    x, hx = seq_input(f), initial_state(f)
    assert_close(run(q, x, hx), run(f, x, hx), atol=1e-5)
    assert_close(run(q, x), run(f, x), atol=1e-5)
    hx1 = tuple(s[0] for s in hx) if isinstance(hx, tuple) else hx[0]
    assert_close(q(x[0, 0], hx1), f(x[0, 0], hx1), atol=1e-5)  # unbatched


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_unrolled_dropout_between_layers_matches_float(cls):
    torch.manual_seed(0)
    f = cls(4, 6, num_layers=3, dropout=0.4).train()
    q = SEQ[cls].from_float(f)
    set_all(q, False)
    q.force_unrolled = True
    x = seq_input(f)
    torch.manual_seed(5)
    ref = f(x)
    torch.manual_seed(5)
    assert_close(q(x), ref, atol=1e-5)
    assert not torch.allclose(q(x)[0], ref[0])  # dropout is live in training


# ---------------------------------------------------------------------- quantization
def test_weight_quantizer_is_per_row_and_used_for_every_weight():
    f, q = build("lstm-proj-2l-bidir")
    wq = q.weight_quantizer
    assert wq.spec.granularity.value == "per_channel" and wq.spec.axis == 0
    for name in q.weight_names:
        w = getattr(f, name)
        scale = w.detach().abs().amax(dim=1) / 127.0  # narrow-range symmetric int8, one scale per row
        expected = fake_quantize(w, scale, torch.zeros(w.shape[0], dtype=torch.int32), wq.spec)
        assert torch.equal(wq(w), expected), name
    # weights only: equals a float LSTM holding the fake-quantized weights
    for q_act in activation_quantizers(q):
        q_act.disable()
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(wq(getattr(f, name)) if name in q.weight_names else getattr(f, name))
    x = seq_input(f)
    assert_close(q(x), ref(x), atol=1e-5)
    assert (q(x)[0] - f(x)[0]).abs().max() > 0


@pytest.mark.parametrize("case", ["lstm-2l-bidir-batchfirst", "lstm-proj-2l-bidir", "gru-2l-bidir-nobias",
                                  "rnn-tanh-2l", "lstmcell", "grucell", "rnncell-relu"])
def test_int8_close_to_float_and_3bit_worse(case):
    f, q8 = build(case)
    _, q3 = build(case, LOW_BITS)
    x = seq_input(f, t=10, b=8)
    for q in (q8, q3):
        calibrate(q, x)
        assert all(a.amax is not None for a in activation_quantizers(q))  # every quantizer saw data
    with torch.no_grad():
        ref, out8, out3 = run(f, x), run(q8, x), run(q3, x)
    cos8, cos3 = cosine(out8, ref), cosine(out3, ref)
    err8, err3 = rel_error(out8, ref), rel_error(out3, ref)
    assert cos8 > 0.99 and err8 > 0, (cos8, err8)  # close, but quantized
    # 3-bit per-tensor: at least 10x the int8 error (measured: 0.002-0.012 vs 0.12-0.50)
    assert cos3 < 0.995 and err3 > 0.1 and err3 > 10 * err8, (cos3, err3, err8)


def test_packed_quantized_equals_each_sequence_alone():
    f, q = build("lstm-proj-2l-bidir", FIXED)
    x, lengths = seq_input(f), [4, 7, 2]
    out, (h, c) = q(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    from torch.nn.utils.rnn import pad_packed_sequence
    padded, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths):  # per-tensor static quantization is elementwise: batching is irrelevant
        out_b, (h_b, c_b) = q(x[:n, b])
        torch.testing.assert_close(padded[:n, b], out_b, atol=1e-5, rtol=0)
        torch.testing.assert_close(h[:, b], h_b, atol=1e-5, rtol=0)
        torch.testing.assert_close(c[:, b], c_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_cell_loop_equals_single_layer_module_quantized(cls):
    torch.manual_seed(0)
    f = cls(4, 6)
    cell_cls = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}[cls]
    cell = cell_cls(4, 6)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(f, n + "_l0"))
    q, qc = SEQ[cls].from_float(f, FIXED), CELLS[cell_cls].from_float(cell, FIXED)
    x = seq_input(f)
    assert_close(run(qc, x)[0], q(x)[0], atol=1e-5)


def test_gradients_flow_through_quantized_path():
    for case in ("lstm-proj-2l-bidir", "gru-2l-bidir-nobias", "rnn-relu-bidir", "lstmcell", "grucell"):
        f, q = build(case)
        x = seq_input(f)
        calibrate(q, x, batches=1)
        x = x.clone().requires_grad_(True)
        out = run(q, x)
        sum(t.sum() for t in flat(out)).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, case
        for name in q.weight_names:
            g = q._parameters[name].grad
            assert g is not None and g.abs().sum() > 0, (case, name)


def test_learned_weight_range_covers_all_weights():
    cfg = LayerQuantConfig(weight=QuantDescriptor(per_channel=True, narrow_range=True, learn_amax=True))
    f, q = build("gru-2l-bidir-nobias", cfg)
    amax = torch.stack([getattr(f, n).detach().abs().amax(1) for n in q.weight_names]).amax(0)
    torch.testing.assert_close(q.weight_quantizer.amax.detach(), amax)
    with pytest.raises(ValueError, match="learn_amax"):
        build("lstm-proj-2l-bidir", cfg)


def test_calibrated_state_dict_round_trips():
    f, q = build("lstm-proj-2l-bidir")
    x = seq_input(f)
    calibrate(q, x, batches=1)
    sd = q.state_dict()
    assert {"layer_input_quantizers.1.amax", "hidden_quantizers.3.amax", "proj_quantizers.3.amax"} <= set(sd)
    fresh = QuantLSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    fresh.load_state_dict(sd)
    assert_close(fresh(x), q(x), atol=0)
