"""`prepare` makes the attention a user's block writes out (matmul → scale → + mask → softmax →
(dropout) → matmul) one `ScaledDotProductAttention` child (`quanta.transforms.attention_rewrite`):
which forms it takes, which it leaves as written and why, that the block computes what it computed
(within float rounding), trains, converts, saves, loads and exports."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.algorithms.capture import quantizers_off
from quanta.integer.base import IntegerModule
from quanta.nn import ScaledDotProductAttention
from quanta.transforms.residual_adds import MARK


class Block(nn.Module):
    """A BERT-style post-LN layer as users and ports write it; ``form`` picks how the attention is spelled."""

    def __init__(self, form: str = "div", hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.form, self.heads, self.d = form, heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.d).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if self.form == "div":
            probs = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)).softmax(dim=-1)
        elif self.form == "mul_mask":
            probs = F.softmax(q @ k.transpose(-2, -1) * (self.d ** -0.5) + mask, dim=-1)
        elif self.form == "module_dropout":
            probs = self.dropout(self.softmax(torch.matmul(q, k.transpose(-1, -2)) / 2.0 + mask))
        elif self.form == "returned_probs":  # the probabilities are used twice: stays as written
            probs = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
            x = x + probs.mean()
        else:  # softmax over the queries: not attention over keys
            probs = torch.matmul(q, k.transpose(-1, -2)).softmax(dim=-2)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.out(ctx))


class Model(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(form) for _ in range(2))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x.mean(1))


def _model(form: str) -> Model:
    torch.manual_seed(0)
    return Model(form).eval()


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.zeros(2, 1, 1, 9)
        mask[1, ..., 6:] = -1e4  # HF-style padding mask
        out.append((torch.randn(2, 9, 32, generator=g), mask))
    return out


def _fused(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ScaledDotProductAttention)]


@pytest.mark.parametrize("form,scale,dropout", [("div", 1 / math.sqrt(8), 0.0), ("mul_mask", 8 ** -0.5, 0.0),
                                                ("module_dropout", 0.5, 0.1)])
def test_the_written_attention_becomes_one_call(form, scale, dropout):
    model = _model(form)
    sim = quanta.prepare(model, quanta.preset("static_int8"))
    assert _fused(sim) == ["blocks.0.fused_attention", "blocks.1.fused_attention"]
    child = sim.blocks[0].fused_attention
    assert child.scale == pytest.approx(scale) and child.dropout_p == dropout
    assert type(sim.blocks[0]) is Block and not _fused(model)  # the class kept, the user's model untouched
    x, mask = _data(1)[0]
    with torch.no_grad(), quantizers_off(sim):
        torch.testing.assert_close(sim(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)
    assert "the forward's attention as one call" in str(quanta.coverage(sim))


@pytest.mark.parametrize("form", ["returned_probs", "softmax_over_queries"])
def test_other_forms_stay_as_written(form):
    sim = quanta.prepare(_model(form), quanta.preset("static_int8"))
    assert not _fused(sim)


def test_config_keeps_the_users_ops():
    base = quanta.preset("static_int8")
    off = dataclasses.replace(base, module_types={**base.module_types, "ScaledDotProductAttention": None})
    assert not _fused(quanta.prepare(_model("div"), off))
    excluded = dataclasses.replace(base, exclude=("blocks.0",))
    assert _fused(quanta.prepare(_model("div"), excluded)) == ["blocks.1.fused_attention"]


def test_a_forward_with_an_optional_mask_stays_as_written():
    class Optional(Block):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(x, mask)

    torch.manual_seed(0)
    model = nn.Sequential(Optional("div"))
    assert not _fused(quanta.prepare(model.eval(), quanta.preset("static_int8")))


def test_integer_model_runs_the_same_attention_and_round_trips(tmp_path):
    model, data = _model("mul_mask"), _data()
    q = quanta.quantize(model, "static_int8", calib_data=data, forward_fn=lambda m, b: m(*b), progress=False,
                        speed_check=False)
    assert _fused(q) == ["blocks.0.fused_attention", "blocks.1.fused_attention"]
    assert isinstance(q.blocks[0].query, IntegerModule) and isinstance(q.blocks[1].out, IntegerModule)
    x, mask = data[0]
    with torch.no_grad():
        ref, got = model(x, mask), q(x, mask)
    assert quanta.analysis.metrics.sqnr_db(ref, got) > 25
    path = tmp_path / "m.safetensors"
    quanta.save(q, path)
    loaded = quanta.load(path, _model("mul_mask"))
    assert _fused(loaded) == _fused(q) and getattr(loaded.blocks[0], MARK)["attention"] == [[0, "fused_attention"]]
    with torch.no_grad():
        assert torch.equal(loaded(x, mask), got)


def test_training_through_the_fused_call_matches_the_users_gradients():
    model, (x, mask) = _model("mul_mask"), _data(1)[0]
    sim = quanta.prepare(model, quanta.preset("static_int8"))
    sim.train()
    model.train()
    with quantizers_off(sim):
        sim(x, mask).square().sum().backward()
    model(x, mask).square().sum().backward()
    for (name, a), (_, b) in zip(sim.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_in_training_draws_as_the_user_code_did():
    model, (x, mask) = _model("module_dropout"), _data(1)[0]
    sim = quanta.prepare(model, quanta.preset("static_int8"))
    sim.train(), model.train()
    with quantizers_off(sim), torch.no_grad():
        torch.manual_seed(5)
        a = sim(x, mask)
        torch.manual_seed(5)
        b = model(x, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_onnx_export_of_the_integer_model(tmp_path):
    pytest.importorskip("onnxruntime")
    model, data = _model("div"), _data()
    q = quanta.quantize(model, "static_int8", calib_data=data, forward_fn=lambda m, b: m(*b), progress=False,
                        speed_check=False)
    path = quanta.export_onnx(q, data[0], tmp_path / "m.onnx")
    report = quanta.compare_onnx(q, path, data[0])
    assert report.within(steps=1, identical=0.0), report  # (float attention: float rounding apart)
