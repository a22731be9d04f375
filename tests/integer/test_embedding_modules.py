"""Int8 / Int4 embeddings: exactly the simulated QuantEmbedding's values, storage, round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor
from quanta.integer.embedding import Int4Embedding, Int8Embedding

CASES = {
    "int8-sym": (None, Int8Embedding, 0.27),
    "int8-asym": (QuantDescriptor(per_channel=True, symmetric=False), Int8Embedding, 0.27),
    "int4-g64": (QuantDescriptor(num_bits=4, group_size=64), Int4Embedding, 0.15),
    "int4-g32-asym": (QuantDescriptor(num_bits=4, group_size=32, symmetric=False), Int4Embedding, 0.17),
    "int4-row": (QuantDescriptor(num_bits=4, per_channel=True), Int4Embedding, 0.15),
}


def _lower(key, rows=1000, dim=256):
    desc, cls, _ = CASES[key]
    torch.manual_seed(0)
    cfg = QuantConfig(default=LayerQuantConfig(weight=desc) if desc else LayerQuantConfig())
    sim = quanta.prepare(nn.Embedding(rows, dim).eval(), cfg)
    return sim, cls.from_simulated(sim)


@pytest.mark.parametrize("key", list(CASES))
def test_exact_storage_round_trip(key):
    sim, im = _lower(key)
    idx = torch.randint(0, 1000, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(sim(idx), im(idx))
        assert torch.equal(sim(idx[0, 0]), im(idx[0, 0]))  # 0-d index
        assert torch.equal(sim(idx.int()), im(idx.int()))
    assert im.storage_bytes() <= CASES[key][2] * 1000 * 256 * 4
    assert im.kernel_counts["reference"] == 3  # the reference is the implementation
    kw = {"group_size": im.group_size} if isinstance(im, Int4Embedding) else {}
    fresh = type(im)(1000, 256, symmetric=im.symmetric, **kw)
    fresh.load_state_dict(im.state_dict())
    assert torch.equal(fresh(idx), im(idx))
    assert type(im).__name__ in repr(im)


def test_odd_shapes_exact():
    sim, im = _lower("int4-row", rows=7, dim=33)  # odd dim: the last byte holds one code
    idx = torch.tensor([[0, 6, 3], [6, 6, 1]])
    assert torch.equal(sim(idx), im(idx))


def test_refusals_and_bad_input():
    sim, im = _lower("int8-sym", rows=10, dim=8)
    assert "Int4Embedding needs" in Int4Embedding.accepts(sim)
    renorm = quanta.prepare(nn.Embedding(10, 8, max_norm=1.0).eval(), QuantConfig())
    assert "max_norm" in Int8Embedding.accepts(renorm)
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_simulated(renorm)
    assert "QuantEmbedding" in Int8Embedding.accepts(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        im(torch.tensor([1.0]))
    with pytest.raises(IndexError, match="out of range"):
        im(torch.tensor([10]))
    with pytest.raises(ValueError, match="group_size"):
        Int4Embedding(10, 30, group_size=8)
