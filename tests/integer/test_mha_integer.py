"""`nn.TransformerEncoderLayer` models under static_int8 (which quantizes MultiheadAttention by default):
MultiheadAttention's in- and out-projections run on the integer Linear kernels
(`Int8MultiheadAttention`), float attention between (the simulation's quantizers applied), masks
and layouts as torch's; save/load exact. Under dynamic_int8 (per-token projections) a decoder's
cross-attention lowers too; under static_int8 it stays simulated and the report says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.attention import Int8MultiheadAttention
from quanta.integer.linear import Int8Linear


def _config() -> quanta.QuantConfig:
    return quanta.preset("static_int8")


def _model(batch_first: bool, norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _inputs(batch_first: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*((4, 10, 32) if batch_first else (10, 4, 32)), generator=g)


@pytest.fixture(scope="module", params=[(True, False), (True, True), (False, False), (False, True)],
                ids=["batch_first", "batch_first-norm_first", "seq_first", "seq_first-norm_first"])
def encoder(request):
    batch_first, norm_first = request.param
    torch.manual_seed(0)
    model = _model(batch_first, norm_first)
    sim = quanta.calibrate(quanta.prepare(model, _config()),
                           [_inputs(batch_first, s) for s in range(3)], progress=False)
    return request.param, model, sim, quanta.convert(sim)


def _mask() -> torch.Tensor:
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[1:, 7:] = True  # padded keys
    return mask


def test_in_and_out_projections_are_integer(encoder):
    _, _, _, q = encoder
    report = {r.name: r.result for r in quanta.conversion_report(q)}
    for i in range(2):
        attn = q.layers[i].self_attn
        assert report[f"layers.{i}.self_attn"] == "Int8MultiheadAttention"
        assert isinstance(attn, Int8MultiheadAttention)
        assert isinstance(attn.in_proj, Int8Linear) and attn.in_proj.out_features == 96
        assert isinstance(attn.out_proj, Int8Linear)


def test_outputs_close_to_fp32_and_to_the_simulation_with_a_padding_mask(encoder):
    (batch_first, _), model, sim, q = encoder
    x, mask = _inputs(batch_first, 7), _mask()
    with torch.no_grad():
        ref, simulated, out = (m(x, src_key_padding_mask=mask) for m in (model, sim, q))
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    torch.testing.assert_close(out, simulated, atol=2e-2, rtol=0)


def test_need_weights_and_unbatched_inputs_behave_as_torch(encoder):
    (batch_first, _), model, _, q = encoder
    attn, ref_attn = q.layers[0].self_attn, model.layers[0].self_attn
    x = _inputs(batch_first, 3)
    with torch.no_grad():
        out, w = attn(x, x, x, need_weights=True)
        ref, ref_w = ref_attn(x, x, x, need_weights=True)
        assert out.shape == ref.shape and w.shape == ref_w.shape
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
        single = x[0] if batch_first else x[:, 0]
        out1, none = attn(single, single, single, need_weights=False)
        assert none is None and out1.shape == single.shape
        copied, _ = attn(x, x.clone(), x.clone(), need_weights=False)  # equal values: self-attention
        assert torch.equal(copied, attn(x, x, x, need_weights=False)[0])
    other = x + 1
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, other, other)


def test_save_load_bit_identical(encoder, tmp_path):
    (batch_first, norm_first), _, _, q = encoder
    quanta.save(q, tmp_path / "enc.quanta")
    back = quanta.load(tmp_path / "enc.quanta", model=_model(batch_first, norm_first))
    x, mask = _inputs(batch_first, 11), _mask()
    with torch.no_grad():
        assert torch.equal(back(x, src_key_padding_mask=mask), q(x, src_key_padding_mask=mask))
    assert isinstance(back.layers[1].self_attn, Int8MultiheadAttention)


class Decoder(nn.Module):
    """A decoder layer (self-attention, cross-attention on ``memory``, feed-forward) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, memory))


def _decoder_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 7, 32, generator=g), torch.randn(3, 5, 32, generator=g)


def _decoder(preset: str):
    torch.manual_seed(0)
    model = Decoder().eval()
    sim = quanta.prepare(model, quanta.preset(preset))
    if preset == "static_int8":
        sim = quanta.calibrate(sim, [_decoder_inputs(s) for s in range(2)], forward_fn=lambda m, b: m(*b),
                               progress=False)
    return model, sim, quanta.convert(sim, speed_check=False)


def test_dynamic_int8_lowers_self_and_cross_attention_as_the_simulation_computes(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, sim, q = _decoder("dynamic_int8")
    for name in ("self_attn", "multihead_attn"):
        attn = getattr(q.layer, name)
        assert isinstance(attn, Int8MultiheadAttention) and attn.in_proj.act_spec.dynamic, name
    x = _decoder_inputs(5)
    with torch.no_grad():
        ref, simulated, out = model(*x), sim(*x), q(*x)
    # each input (query; key = value = memory) quantized per token on its own, as the simulation's
    # key / value quantizers do: the same codes, float32 summation order apart
    torch.testing.assert_close(out, simulated, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    assert q.layer.multihead_attn.in_proj.kernel_counts.total() == 2  # the query's call, then memory's
    quanta.export_onnx(q, x, tmp_path / "decoder.onnx")
    report = quanta.compare_onnx(q, tmp_path / "decoder.onnx", x, layers=False)
    assert report.outputs[0].max_rel_diff < 1e-3, report


def test_static_int8_keeps_cross_attention_simulated_and_says_why():
    _, _, q = _decoder("static_int8")
    assert isinstance(q.layer.self_attn, Int8MultiheadAttention)
    assert not isinstance(q.layer.multihead_attn, Int8MultiheadAttention)
    row = {r.name: r for r in quanta.conversion_report(q)}["layer.multihead_attn"]
    assert row.result == "simulated" and "cross-attention" in row.detail


def test_quantize_with_the_speed_check_replays_the_attention():
    """`quanta.quantize` times each integer module on copies of its recorded inputs (the query,
    key and value arrive as three equal tensors): the attention runs, kept or put back as float."""
    torch.manual_seed(0)
    model = _model(True, False)
    q = quanta.quantize(model, "static_int8", [_inputs(True, s) for s in range(2)], progress=False)
    report = {r.name: r.result for r in quanta.conversion_report(q)}
    assert report["layers.0.self_attn"] in ("Int8MultiheadAttention", "float")
    x = _inputs(True, 5)
    with torch.no_grad():
        assert F.cosine_similarity(model(x).flatten(), q(x).flatten(), dim=0) > 0.99
