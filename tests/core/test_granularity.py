"""Granularity: compact parameter shapes, which values share a scale, and global ranges."""

from __future__ import annotations

import pytest
import torch

from quanta.core import (
    QuantSpec,
    choose_qparams,
    compact_shape,
    compute_range,
    dequantize,
    global_range,
    quantize,
    quantize_tensor,
)

from .helpers import expand_param, ref_range

X_SHAPE = (6, 8, 4)
CASES = [  # (id, spec kwargs, compact shape of a [6, 8, 4] tensor)
    ("per_tensor", {}, ()),
    ("per_channel-axis0", {"granularity": "per_channel", "axis": 0}, (6,)),
    ("per_channel-axis1", {"granularity": "per_channel", "axis": 1}, (8,)),
    ("per_channel-axis-1", {"granularity": "per_channel", "axis": -1}, (4,)),
    ("per_group-last-g2", {"granularity": "per_group", "group_size": 2}, (6, 8, 2)),
    ("per_group-axis1-g4", {"granularity": "per_group", "group_size": 4, "group_axis": 1}, (6, 2, 4)),
    ("per_group-axis0-g3", {"granularity": "per_group", "group_size": 3, "group_axis": 0}, (2, 8, 4)),
    ("per_group-axis-3-g2", {"granularity": "per_group", "group_size": 2, "group_axis": -3}, (3, 8, 4)),
    ("per_token", {"granularity": "per_token"}, (6, 8, 1)),
]


def _x(shape=X_SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # every slice gets its own magnitude so that a swapped axis gives different ranges
    return torch.randn(shape, generator=g) * torch.rand(shape, generator=g).add(0.1).exp2() * 3


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_compact_shape_and_ranges(name, kw, shape):
    spec = QuantSpec(**kw)
    x = _x()
    assert compact_shape(x.shape, spec) == shape
    lo, hi = compute_range(x, spec)
    rlo, rhi = ref_range(x, spec)
    assert lo.shape == shape and hi.shape == shape
    assert torch.equal(lo, rlo.reshape(shape)) and torch.equal(hi, rhi.reshape(shape))
    qt = quantize_tensor(x, spec)
    assert qt.scale.shape == shape and qt.zero_point.shape == shape and qt.q.shape == x.shape


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_each_slice_is_quantized_with_its_own_parameters(name, kw, shape, symmetric):
    """Quantizing the whole tensor equals quantizing every element with its slice's own
    per-tensor parameters (computed from the slice by explicit indexing)."""
    spec = QuantSpec(bits=4, symmetric=symmetric, **kw)
    x = _x(seed=1)
    qt = quantize_tensor(x, spec)
    rlo, rhi = ref_range(x, spec)
    scale, zp = choose_qparams(rlo.reshape(shape), rhi.reshape(shape), spec)
    s = expand_param(scale, x.shape, spec)
    z = expand_param(zp, x.shape, spec).float()
    ref = (torch.round(x * (1.0 / s)) + z).clamp(spec.qmin, spec.qmax)
    assert torch.equal(qt.q.float(), ref)
    assert torch.equal(qt.dequantize(), (ref - z) * s)


def test_linear_weight_conventions():
    """[out, in] weight: per output channel is axis=0 -> [out]; groups run along `in`."""
    w = _x((5, 12), seed=2)
    per_out = QuantSpec(bits=8, granularity="per_channel", axis=0)
    assert compute_range(w, per_out)[1].tolist() == w.amax(dim=1).tolist()
    grouped = QuantSpec(bits=4, granularity="per_group", group_size=4)
    lo, hi = compute_range(w, grouped)
    assert hi.shape == (5, 3)
    assert hi[2, 1].item() == w[2, 4:8].max().item()


def test_whole_axis_group_equals_per_channel_and_per_token():
    w = _x((5, 12), seed=3)
    a = quantize_tensor(w, QuantSpec(bits=4, granularity="per_group", group_size=12))
    b = quantize_tensor(w, QuantSpec(bits=4, granularity="per_channel", axis=0))
    c = quantize_tensor(w, QuantSpec(bits=4, granularity="per_token"))
    assert torch.equal(a.q, b.q) and torch.equal(a.q, c.q)
    assert torch.equal(a.scale.reshape(5), b.scale) and torch.equal(c.scale.reshape(5), b.scale)
    assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(c.dequantize(), b.dequantize())
    # ... and a swapped axis is a different quantization
    d = quantize_tensor(w, QuantSpec(bits=4, granularity="per_group", group_size=5, group_axis=0))
    assert not torch.equal(d.dequantize(), b.dequantize())


def test_per_token_keeps_leading_dims():
    x = _x((2, 3, 8), seed=4)
    spec = QuantSpec(bits=8, granularity="per_token")
    assert spec.dynamic  # per-token ranges are computed per call
    qt = quantize_tensor(x, spec)
    assert qt.scale.shape == (2, 3, 1)
    assert torch.equal(qt.scale, x.abs().amax(dim=-1, keepdim=True) / 127)
    # a 1-d activation is one token
    assert quantize_tensor(x[0, 0], spec).scale.shape == (1,)


def test_non_contiguous_inputs_match_contiguous_copies():
    x = _x((8, 6), seed=5)
    for view in (x.t(), x[:, ::2], x[::2].t()):
        for spec in (QuantSpec(bits=4, granularity="per_channel", axis=1),
                     QuantSpec(bits=4, granularity="per_group", group_size=2, group_axis=0),
                     QuantSpec(bits=4, granularity="per_token")):
            a, b = quantize_tensor(view, spec), quantize_tensor(view.contiguous(), spec)
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
            assert torch.equal(dequantize(a.q, a.scale, a.zero_point, spec), b.dequantize())


def test_global_range_over_a_list_of_tensors():
    ts = [_x((3, 4), seed=6), _x((7,), seed=7) * 5, _x((2, 2, 2), seed=8) - 10]
    ts0 = [t.clone() for t in ts]
    lo, hi = global_range(ts)
    assert lo.shape == () and hi.shape == ()
    assert lo.item() == min(t.min().item() for t in ts) and hi.item() == max(t.max().item() for t in ts)
    spec = QuantSpec(bits=8, granularity="global")
    scale, zp = choose_qparams(lo, hi, spec)
    for t in ts:  # every member is quantized on the one shared grid
        q = quantize(t, scale, zp, spec)
        assert torch.equal(q.float(), torch.round(t * (1.0 / scale)).clamp(-128, 127))
    assert all(torch.equal(a, b) for a, b in zip(ts, ts0))
    with pytest.raises(ValueError, match="at least one"):
        global_range([])
