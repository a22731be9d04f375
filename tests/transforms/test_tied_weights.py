"""Tied weights stay tied through convert, save and load (one int8 table, counted and stored
once), or the report says the tie is broken."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.embedding import Int8Embedding
from quanta.integer.linear import Int8Linear
from quanta.kernels import linear as linear_kernels


class TiedLM(nn.Module):
    """A GPT-2-shaped toy: token embedding, one block, output layer tied to the embedding."""

    def __init__(self, vocab: int = 300, dim: int = 64) -> None:
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.wte = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.lm_head(h + self.mlp(h))


def _model() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("preset", ["dynamic_int8", "weight_only_int8"])
def test_tied_output_layer_shares_one_int8_table(preset, tmp_path):
    model = _model()
    q = quanta.quantize(model, preset, speed_check=False)
    assert isinstance(q.wte, Int8Embedding)
    assert q.lm_head.weight is q.wte.weight and q.lm_head.weight_scale is q.wte.weight_scale
    table = 300 * 64  # int8 codes, counted once (plus 300 float32 scales)
    mlp_int8 = 64 * 256 * 2
    assert quanta.storage_bytes(q) < table + 300 * 4 + mlp_int8 + 4 * (256 + 64) * 3 + 4096
    with torch.no_grad():
        ref, out = model(_ids()), q(_ids())
    assert _cosine(ref, out) > 0.999
    rows = {r.name: r for r in quanta.conversion_report(q)}
    assert rows["wte"].result == "Int8Embedding" and rows["lm_head"].result != "float"
    sim = quanta.prepare(model, quanta.preset(preset))  # the simulation computes what the integer model does
    with torch.no_grad():
        simulated = sim(_ids())
    if preset == "dynamic_int8":
        torch.testing.assert_close(out, simulated, atol=1e-5, rtol=1e-6)
    else:  # (bf16 activations: the kernel and the simulation round their sums differently)
        assert _cosine(out, simulated) > 0.9999
    path = tmp_path / "tied.safetensors"
    quanta.save(q, path)
    loaded = quanta.load(path, model=TiedLM)
    assert loaded.lm_head.weight is loaded.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), out)
    untied = _model()
    untied.lm_head.weight = nn.Parameter(untied.wte.weight.detach().clone())
    quanta.save(quanta.quantize(untied, preset, speed_check=False), tmp_path / "untied.safetensors")
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "untied.safetensors") - 300 * 64 // 2


def test_the_tie_survives_huge_page_rehoming(monkeypatch, tmp_path):
    """Large tables are re-homed (copied into huge-page memory) by pack(): both holders end on
    the re-homed tensor, after convert and after load."""
    if not quanta.kernels.native.ready():
        pytest.skip("re-homing needs the native library")
    monkeypatch.setattr(linear_kernels, "HUGE_PAGE_BYTES", 1)
    q = quanta.quantize(_model(), "dynamic_int8", speed_check=False)
    assert q.lm_head.weight is q.wte.weight
    assert getattr(q.lm_head.weight, "_quanta_homed", None) == q.lm_head.weight.data_ptr()
    quanta.save(q, tmp_path / "m.safetensors")
    loaded = quanta.load(tmp_path / "m.safetensors", model=TiedLM)
    assert loaded.lm_head.weight is loaded.wte.weight
    loaded.lm_head.pack()
    assert loaded.lm_head.weight is loaded.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), q(_ids()))


def test_a_tie_that_cannot_be_shared_is_reported():
    q = quanta.quantize(_model(), "weight_only_int4", speed_check=False, group_size=32)
    assert type(q.wte) is nn.Embedding
    rows = {r.name: r for r in quanta.conversion_report(q)}
    assert "tie is broken" in rows["lm_head"].detail


def test_an_embedding_excluded_by_name_stays_float_and_the_broken_tie_is_reported():
    q = quanta.quantize(_model(), "dynamic_int8", speed_check=False, exclude=["wte"])
    assert type(q.wte) is nn.Embedding
    rows = {r.name: r for r in quanta.conversion_report(q)}
    assert "tie is broken" in rows["lm_head"].detail


def test_two_integer_layers_sharing_a_weight_share_codes():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    q = quanta.quantize(Twice().eval(), "dynamic_int8", speed_check=False)
    assert isinstance(q.a, Int8Linear) and q.a.weight is q.b.weight


def test_gpt2_lm_head_stays_tied(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=500, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    q = quanta.quantize(model, "dynamic_int8", speed_check=False)
    assert q.lm_head.weight is q.transformer.wte.weight
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _cosine(model(ids).logits, q(ids).logits) > 0.999
    quanta.save(q, tmp_path / "gpt2.safetensors")
    loaded = quanta.load(tmp_path / "gpt2.safetensors", model=lambda: transformers.GPT2LMHeadModel(cfg))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
