"""Tier 2/3: the native recurrent loop past the old 8-sequence limit, and its thread split.

- Where the build has AVX2 without VNNI, LSTM / GRU models run the native loop at any batch
  (1, 3, 9, 17: the old limit was 8, above which the Python ``int_mm`` loop ran), and compute
  what the reference kernels compute (to float rounding: the gates' SLEEF expf / tanhf, as in
  tests/integer/test_recurrent_native_model.py).
- The loop gives the same bits with 1 and 2 threads (one barrier a step, every thread quantizing
  the whole previous h itself), for every mode and activation grid, forwards and reversed.
- The input projection equals the reference's ``qlinear`` bit for bit with either thread count,
  also after its weight is changed in place (the cached row sums follow the tensor's version).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.kernels import native
from quanta.kernels import recurrent_native as RN
from quanta.kernels.gemv_rows import gemv_isa
from quanta.kernels.recurrent import dynamic_int8_rnn
from quanta.kernels.recurrent_math import act_spec, qlinear

needs_native_loop = pytest.mark.skipif("native" not in dynamic_int8_rnn.available_impls(),
                                       reason=f"no native recurrent loop here (gemv loop: {gemv_isa()})")
needs_avx2_loop = pytest.mark.skipif(gemv_isa() != "avx2" or "native" not in dynamic_int8_rnn.available_impls(),
                                     reason=f"any batch natively: AVX2 without VNNI (gemv loop: {gemv_isa()})")

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
ACTS = {"s8sym": (8, True, True, False), "u8asym": (8, False, False, False), "s8asym": (8, True, False, False)}


class Tagger(nn.Module):
    """Linear embedding, a recurrent layer (batch first), a classifier on every step."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.embed = nn.Linear(12, rnn.input_size)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(y)


MODELS = {
    "lstm-2layers": lambda: nn.LSTM(24, 40, num_layers=2, batch_first=True),
    "gru-bi": lambda: nn.GRU(24, 33, batch_first=True, bidirectional=True),
}


@needs_avx2_loop
@pytest.mark.parametrize("name", list(MODELS))
def test_every_batch_runs_the_native_loop_like_the_reference(name, torch_threads):
    torch.manual_seed(0)
    q = quanta.quantize(Tagger(MODELS[name]()).eval(), "dynamic_int8", progress=False)
    ref = copy.deepcopy(q)
    ref.rnn.impl = "reference"
    ref.rnn.pack()
    for batch in (1, 3, 9, 17):
        h = torch.relu(q.embed(torch.randn(batch, 11, 12)))
        with torch.no_grad():
            runs = {}
            for n in (1, 2):
                with torch_threads(n):
                    runs[n] = q.rnn(h)
            out_ref = ref.rnn(h)
        for a, b in zip(runs[1], runs[2]):  # output and final states: the thread count changes no bit
            a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.cat(a), torch.cat(b))
            assert torch.equal(a, b), (name, batch)
        out, out_r = runs[1][0], out_ref[0]
        d = (out - out_r).abs() / (1 + out_r.abs())
        assert float(d.max()) <= 1e-5 or (float(d.max()) <= 0.2 and float(d.mean()) <= 1e-2), \
            (name, batch, float(d.max()), float(d.mean()))
    assert set(q.rnn.kernel_counts) == {"native"}, q.rnn.kernel_counts  # batch 9 and 17 too
    assert q.rnn.kernel_counts["native"] == 8


@needs_native_loop
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", list(GATES))
def test_one_and_two_threads_give_the_same_bits(mode, act, torch_threads, rnn_layer_case):
    spec = act_spec(*ACTS[act])
    for batch, hidden in ((1, 40), (3, 33), (9, 64), (17, 31)):
        gi, state, w, s, b = rnn_layer_case(mode, batch, hidden, seed=batch * 100 + hidden)
        w_sum = native.module().int8_row_sums(w)
        runs = []
        for n in (1, 2):
            with torch_threads(n):
                runs.append(native.module().rnn_layer(mode, gi, state, w, s, b, w_sum, spec.qmin, spec.qmax,
                                                      spec.symmetric, spec.signed, batch == 3))
        for x, y in zip(*runs):
            assert torch.equal(x, y), (mode, act, batch, hidden)
        assert all(torch.isfinite(t).all() for t in runs[0])


@needs_native_loop
@pytest.mark.parametrize("rows", [1, 64, 600], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("act", list(ACTS))
def test_input_projection_equals_the_reference_bitwise_also_after_an_inplace_change(rows, act, torch_threads):
    spec = act_spec(*ACTS[act])
    gen = torch.Generator().manual_seed(rows)
    w = torch.randint(-128, 128, (4 * 33, 70), dtype=torch.int8, generator=gen)
    s, b = torch.rand(4 * 33, generator=gen) * 0.01 + 1e-3, torch.randn(4 * 33, generator=gen)
    x = torch.randn(rows, 1, 70, generator=gen) * 2
    q = RN._quantize_sequence(x, spec)
    for n in (1, 2):
        with torch_threads(n):
            assert torch.equal(RN._input_projection(x, *q, w, s, b), qlinear(x, w, s, b, spec)[0])
    # the same weight changed in place: its row sums (the zero-point term) are computed again
    w[3] = 127
    assert torch.equal(RN._row_sums(w), w.int().sum(1, dtype=torch.int32))
    assert torch.equal(RN._input_projection(x, *q, w, s, b), qlinear(x, w, s, b, spec)[0])


@needs_native_loop
def test_the_batch_limit_follows_the_build():
    x = torch.zeros(5, 33, 4)
    weights = [torch.zeros(8, 4, dtype=torch.int8)] * 6
    why = RN.guard_native(x, weights, 8, 33)
    if gemv_isa() == "avx512_vnni":
        assert RN.native_max_batch() == RN.VNNI_MAX_BATCH and "batch 33" in why
    else:
        assert RN.native_max_batch() is None and why is None
