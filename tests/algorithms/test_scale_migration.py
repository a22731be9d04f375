"""Finding and verifying the norm → Linear and Linear → Linear groups SmoothQuant and AWQ scale
(`quanta.algorithms.norm_pairs`, `scale_migration`), on models built like users' models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.algorithms import awq, smoothquant

transformers = pytest.importorskip("transformers")


def _llama(kv_heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tokens(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (4, 16), generator=g) for _ in range(n)]


def _first(out) -> torch.Tensor:
    return out[0] if not isinstance(out, torch.Tensor) else out


def _groups(record: dict) -> dict[str, list[str]]:
    return {r["source"]: r["consumers"] for r in record["groups"]}


def test_llama_groups_are_the_norms_and_the_linear_pairs_and_the_float_model_is_unchanged():
    model = _llama()
    data = _tokens()
    with torch.no_grad():
        before = model(data[0]).logits
    record = awq(model, data, quanta.preset("weight_only_int4", group_size=32))
    groups = _groups(record)
    for i in range(2):
        p = f"model.layers.{i}"
        assert groups[f"{p}.input_layernorm"] == [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        assert groups[f"{p}.post_attention_layernorm"] == [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        assert groups[f"{p}.self_attn.v_proj"] == [f"{p}.self_attn.o_proj"]  # attention mixes tokens, not channels
        assert groups[f"{p}.mlp.up_proj"] == [f"{p}.mlp.down_proj"]  # act(gate) * up is linear in up
    skipped = {r["group"]: r["reason"] for r in record["skipped"]}
    assert "output reaches more than these Linears, or not linearly" in skipped[
        "model.layers.0.self_attn.q_proj → model.layers.0.self_attn.o_proj"]  # softmax(q k) is not
    assert "model.layers.0.mlp.gate_proj → model.layers.0.mlp.down_proj" in skipped  # silu(gate) is not
    assert any(r["scaled"] for r in record["groups"])
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]).logits, before, rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_v_proj_is_narrower_than_o_proj_so_no_pair():
    model = _llama(kv_heads=2)
    record = smoothquant(model, _tokens(), linear_pairs=True)
    sources = _groups(record)
    assert "model.layers.0.self_attn.v_proj" not in sources
    assert "model.layers.0.input_layernorm" in sources


def test_gpt2_conv1d_layers_are_fed_by_ln_1_and_ln_2():
    model = _gpt2()
    data = _tokens()
    with torch.no_grad():
        before = model(data[0]).logits
    record = smoothquant(model, data)
    groups = _groups(record)
    for i in range(2):
        assert groups[f"transformer.h.{i}.ln_1"] == [f"transformer.h.{i}.attn.c_attn"]
        assert groups[f"transformer.h.{i}.ln_2"] == [f"transformer.h.{i}.mlp.c_fc"]
    assert "transformer.ln_f" not in groups  # ln_f → the tied lm_head: rescaling it would change the embedding
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]).logits, before, rtol=1e-4, atol=1e-5)


def test_bert_post_ln_norms_feed_the_residual_too_so_they_are_skipped_with_the_reason():
    model = _bert()
    data = _tokens()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="unchanged"):
        record = smoothquant(model, data)
    assert record["groups"] == []
    reasons = {r["group"].split(" → ")[0]: r["reason"] for r in record["skipped"]}
    assert "reaches more than these Linears" in reasons["encoder.layer.0.attention.output.LayerNorm"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # bit for bit unchanged
    pairs = smoothquant(model, data, linear_pairs=True)  # value → attention.output.dense is a valid pair
    assert _groups(pairs)["encoder.layer.0.attention.self.value"] == ["encoder.layer.0.attention.output.dense"]


class OnePlusWeightNorm(nn.Module):
    """Gemma-style RMSNorm: ``x̂ · (1 + w)``; its output does not scale with ``w``."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class ScaledNorm(nn.Module):
    """A T5LayerNorm-style class with an unrelated name: ``w · x̂``."""

    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # a second parameter: not a norm quanta can fold into
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self, norm: nn.Module, n: int = 32):
        super().__init__()
        self.norm, self.up, self.down = norm, nn.Linear(n, 2 * n), nn.Linear(2 * n, n)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _feature_batches(n: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 6, n, generator=g) for _ in range(2)]


def test_a_norm_is_recognised_by_what_its_forward_computes_not_by_its_name():
    torch.manual_seed(0)
    model = Block(nn.RMSNorm(32, elementwise_affine=True))
    assert _groups(smoothquant(model, _feature_batches())) == {"norm": ["up"]}
    gemma = Block(OnePlusWeightNorm(32))
    with pytest.warns(UserWarning, match="unchanged"):
        record = smoothquant(gemma, _feature_batches())
    assert "does not scale with its weight" in record["skipped"][0]["reason"]
    with pytest.warns(UserWarning, match="no norm"):
        record = smoothquant(Block(ScaledNorm(32)), _feature_batches())
    assert record["groups"] == [] and record["skipped"] == []


def test_no_norm_to_linear_pair_leaves_the_model_unchanged_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    state = copy.deepcopy(model.state_dict())
    data = [torch.randn(64, 16)]
    with pytest.warns(UserWarning, match="no norm → Linear"):
        record = smoothquant(model, data)
    assert record["groups"] == [] and "unchanged" in record["note"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_too_little_calibration_data_raises_with_the_numbers_and_leaves_the_model_untouched():
    model = _llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"6 token\(s\) reached a Linear, it needs at least 32"):
        smoothquant(model, [torch.randint(0, 96, (1, 6))])
    with pytest.raises(ValueError, match=r"at least 500"):
        awq(model, _tokens(), min_tokens=500)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_simulated_model_and_bad_options_are_refused():
    sim = quanta.prepare(_llama(), quanta.preset("dynamic_int8"))
    with pytest.raises(ValueError, match="runs on the float model"):
        smoothquant(sim, _tokens())
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(_llama(), _tokens(), alpha=1.5)
    with pytest.raises(ValueError, match="AWQOptions.grid"):
        awq(_llama(), _tokens(), grid=0)
    with pytest.raises(TypeError, match="iterable of batches"):
        awq(_llama(), torch.randint(0, 96, (4, 16)))


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_torch_transformer_encoder_layer_pre_ln_norm_feeds_linear1_post_ln_does_not(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    data = [torch.randn(4, 8, 32) for _ in range(2)]
    with torch.no_grad():
        before = model(data[0])
    record = smoothquant(model, data, linear_pairs=True)
    groups = _groups(record)
    assert groups["layers.0.linear1"] == ["layers.0.linear2"]  # through ReLU: positive scales commute with it
    if norm_first:
        assert groups["layers.0.norm2"] == ["layers.0.linear1"]
    else:  # the post-LN norm's output is also the residual
        assert "layers.0.norm1" not in groups
        assert any(r["group"] == "layers.0.norm1 → layers.0.linear1" for r in record["skipped"])
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]), before, rtol=1e-4, atol=1e-5)
