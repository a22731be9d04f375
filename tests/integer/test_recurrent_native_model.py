"""Tier 3: user-style LSTM / GRU models quantized with ``quanta.quantize(..., "dynamic_int8")`` run
the native kernels wherever the build has the native gemv loop (AVX-512 VNNI or, without VNNI,
AVX2's exact ``vpmaddwd``): the recurrent layer's C++ time loop and the head's gemv, which is
recorded in ``kernel_counts``; and they compute what the same model forced onto the reference
kernels computes: the head's gemv bit for bit, the time loop to float rounding (its gates use
SLEEF's expf / tanhf, within an ulp of ATen's: the bound of tests/kernels/test_recurrent_kernels.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.linear import Int8Linear
from quanta.kernels.gemv_rows import gemv_isa
from quanta.kernels.recurrent import dynamic_int8_rnn

needs_native_loop = pytest.mark.skipif("native" not in dynamic_int8_rnn.available_impls(),
                                       reason=f"no native recurrent loop here (gemv loop: {gemv_isa()})")


class Tagger(nn.Module):
    """Linear embedding, a recurrent layer (batch first), a classifier on the last step."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        dirs = 2 if rnn.bidirectional else 1
        self.embed = nn.Linear(12, rnn.input_size)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * dirs, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(y[:, -1])


MODELS = {
    "lstm": lambda: nn.LSTM(24, 40, num_layers=2, batch_first=True),
    "gru-bi": lambda: nn.GRU(24, 33, batch_first=True, bidirectional=True),
}


def _integer(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The quantized model's recurrent module and its head."""
    return model.rnn, model.head


def _reference(q: nn.Module) -> nn.Module:
    ref = copy.deepcopy(q)
    for m in ref.modules():
        if hasattr(m, "kernel_counts") and hasattr(m, "impl"):
            m.impl = "reference"
            m.pack()
    return ref


@needs_native_loop
@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_int8_rnn_model_runs_the_native_kernels_like_the_reference(name):
    torch.manual_seed(0)
    model = Tagger(MODELS[name]()).eval()
    q = quanta.quantize(model, "dynamic_int8", progress=False)
    rnn, head = _integer(q)
    assert type(rnn).__name__.startswith("DynamicInt8") and isinstance(head, Int8Linear)
    ref = _reference(q)
    x = torch.randn(3, 17, 12)
    with torch.no_grad():
        y, y_ref = q(x), ref(x)
        # the recurrent layer alone, on the same input: the loop against the reference's
        h = torch.relu(q.embed(x))
        out, out_ref = rnn(h)[0], ref.rnn(h)[0]
        # the head alone, on the same input: the gemv's exact sums, the same epilogue
        last = out[:, -1]
        assert torch.equal(head(last), ref.head(last))
    assert set(rnn.kernel_counts) == {"native"}, rnn.kernel_counts
    assert set(ref.rnn.kernel_counts) == {"reference"}
    assert head.kernel_counts["gemv_native"] >= 2 and set(head.kernel_counts) == {"gemv_native"}, head.kernel_counts
    d = (out - out_ref).abs() / (1 + out_ref.abs())
    assert float(d.max()) <= 1e-5 or (float(d.max()) <= 0.2 and float(d.mean()) <= 1e-2), (float(d.max()), float(d.mean()))
    # the model: within the quantization error of a one-code flip, far below it in the typical case
    assert float((y - y_ref).abs().max()) <= 2e-2 * (1 + float(y_ref.abs().max()))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(y.flatten(), model(x).flatten(), dim=0)
    assert float(cos) > 0.98  # and it is still the float model's function (a broken kernel is far off)


@needs_native_loop
@pytest.mark.parametrize("rows", [1, 64, 600], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("act", [(8, True, True, False), (8, False, False, False)], ids=["s8sym", "u8asym"])
def test_input_projection_equals_the_reference_bitwise(rows, act):
    """The native loop's input projection (the whole sequence at once: the gemv up to
    `INPUT_GEMV_MAX_ROWS` rows without VNNI, float_sums beyond; torch._int_mm with VNNI) gives the
    reference's `qlinear` output bit for bit: same codes, exact sums, the same float32 rescale."""
    from quanta.kernels import recurrent_native as RN
    from quanta.kernels.recurrent_math import act_spec, qlinear
    assert 64 <= RN.INPUT_GEMV_MAX_ROWS < 600  # (both paths below)
    gen = torch.Generator().manual_seed(rows)
    spec = act_spec(*act)
    w = torch.randint(-128, 128, (4 * 33, 24), dtype=torch.int8, generator=gen)
    s, b = torch.rand(4 * 33, generator=gen) * 0.01 + 1e-3, torch.randn(4 * 33, generator=gen)
    x = torch.randn(rows, 1, 24, generator=gen) * 2
    y = RN._input_projection(x, *RN._quantize_sequence(x, spec), w, s, b)
    assert torch.equal(y, qlinear(x, w, s, b, spec)[0])
