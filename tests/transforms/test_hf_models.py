"""Models built the way Hugging Face transformers builds them (small configs, no download)."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.integer.linear import Int8Linear
from quanta.integer.weight_only import Int4WeightOnlyLinear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return config, transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _conv1d_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def test_gpt2_conv1d_layers_are_quantized_and_lowered(gpt2, tokens):
    _, model = gpt2
    names = _conv1d_names(model)
    assert len(names) == 8  # c_attn, c_proj, c_fc, mlp c_proj per block
    sim = quanta.prepare(model, quanta.preset("dynamic_int8"))
    assert sim.lm_head.weight is sim.transformer.wte.weight  # the tied head stays tied
    assert all(type(sim.get_submodule(n)).__name__ == "QuantHFConv1D" for n in names)
    q = quanta.convert(sim)
    report = {r.name: r for r in quanta.conversion_report(q)}
    assert all(report[n].result == "Int8Linear" and report[n].simulated == "QuantHFConv1D" for n in names)
    assert all(isinstance(q.get_submodule(n), Int8Linear) for n in names)
    with torch.no_grad():
        ref, simulated, out = model(tokens).logits, sim(tokens).logits, q(tokens).logits
    assert _cos(ref, out) > 0.999  # measured 0.99995
    torch.testing.assert_close(out, simulated, atol=1e-5, rtol=0)  # integer == simulation


def test_gpt2_weight_only_int4_groups_run_along_conv1d_inputs(gpt2, tokens):
    _, model = gpt2
    q = quanta.quantize(model, "weight_only_int4", group_size=32, speed_check=False, progress=False)
    assert all(isinstance(q.get_submodule(n), Int4WeightOnlyLinear) for n in _conv1d_names(model))
    with torch.no_grad():
        assert _cos(model(tokens).logits, q(tokens).logits) > 0.98  # measured 0.9949


def test_conv1d_type_rule_is_applied_not_ignored(gpt2):
    _, model = gpt2
    sim = quanta.prepare(model, quanta.QuantConfig(default=quanta.preset("dynamic_int8").default,
                                                   module_types={"Conv1D": None}))
    assert all(type(sim.get_submodule(n)) is Conv1D for n in _conv1d_names(model))
    assert type(sim.lm_head).__name__ == "QuantLinear"


def test_simulated_conv1d_equals_a_simulated_linear_on_the_transposed_weight(gpt2):
    _, model = gpt2
    layer = model.transformer.h[0].attn.c_attn
    linear = torch.nn.Linear(layer.nx, layer.nf)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        linear.bias.copy_(layer.bias)
    cfg = quanta.preset("dynamic_int8").default
    sim_conv = quanta.prepare(torch.nn.Sequential(layer), quanta.QuantConfig(default=cfg))
    sim_lin = quanta.prepare(torch.nn.Sequential(linear), quanta.QuantConfig(default=cfg))
    x = torch.randn(3, 5, layer.nx)
    with torch.no_grad():
        torch.testing.assert_close(sim_conv(x), sim_lin(x), atol=1e-6, rtol=0)


def test_converted_gpt2_saves_and_loads_exactly(gpt2, tokens, tmp_path):
    config, model = gpt2
    q = quanta.quantize(model, "dynamic_int8", speed_check=False, progress=False)
    quanta.save(q, tmp_path / "gpt2.safetensors")
    torch.manual_seed(1)
    loaded = quanta.load(tmp_path / "gpt2.safetensors", transformers.GPT2LMHeadModel(config).eval())
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)
