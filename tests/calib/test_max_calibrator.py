"""MaxCalibrator: running min / max, per tensor and per kept axis; exact merging."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.calib import MaxCalibrator


def _batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) + i for i in range(n)]


def _reference(x: torch.Tensor, axis: int | None):
    """Direct reduction: amin / amax over every dimension except the kept one."""
    if axis is None:
        return torch.aminmax(x)
    others = tuple(d for d in range(x.dim()) if d != axis % x.dim())
    return torch.amin(x, dim=others), torch.amax(x, dim=others)


SHAPES_AXES = [
    ((7,), None), ((7,), 0), ((7,), -1), ((5, 3), 0), ((5, 3), 1), ((5, 3), -2),
    ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -1), ((2, 3, 4, 5), 0), ((1, 33, 1), 1), ((), None),
]


@pytest.mark.parametrize("shape,axis", SHAPES_AXES, ids=[f"{s}-axis{a}" for s, a in SHAPES_AXES])
def test_matches_direct_reduction(shape, axis):
    batches = _batches(shape)
    cal = MaxCalibrator(axis=axis)
    for b in batches:
        cal.collect(b)
    lo, hi = cal.compute_range()
    ref_lo, ref_hi = _reference(torch.stack(batches).movedim(0, -1), None if axis is None else axis % max(len(shape), 1))
    assert lo.dtype == hi.dtype == torch.float32
    assert lo.shape == ((shape[axis],) if axis is not None else ())
    torch.testing.assert_close(lo, ref_lo, atol=0, rtol=0)
    torch.testing.assert_close(hi, ref_hi, atol=0, rtol=0)
    torch.testing.assert_close(cal.compute_amax(), torch.maximum(ref_lo.abs(), ref_hi.abs()), atol=0, rtol=0)


def test_non_contiguous_input():
    x = torch.randn(6, 8).t()  # [8, 6], non-contiguous
    cal = MaxCalibrator(axis=0)
    cal.collect(x)
    lo, hi = cal.compute_range()
    torch.testing.assert_close(lo, x.amin(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(hi, x.amax(dim=1), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = (torch.randn(50) * 10).to(dtype)
    cal = MaxCalibrator()
    cal.collect(x)
    lo, hi = cal.compute_range()
    assert lo.dtype == torch.float32
    assert lo == x.min().float() and hi == x.max().float()


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_merge_equals_one_calibrator(axis):
    batches = _batches((6, 5), n=6, seed=3)
    whole = MaxCalibrator(axis=axis)
    for b in batches:
        whole.collect(b)
    parts = [MaxCalibrator(axis=axis) for _ in range(3)]
    for i, b in enumerate(batches):
        parts[i % 3].collect(b)
    merged = MaxCalibrator(axis=axis)  # empty: the first merge copies
    for p in reversed(parts):
        merged.merge(p)
    _assert_same_state(merged, whole)
    assert parts[0].num_batches == 2  # merge leaves `other` unchanged


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-2.0**100, 2.0**100, width=32), min_size=1, max_size=12), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_merge_is_order_independent(batches, rnd):
    tensors = [torch.tensor(b, dtype=torch.float32) for b in batches]
    whole = MaxCalibrator()
    for t in tensors:
        whole.collect(t)
    shuffled = list(tensors)
    rnd.shuffle(shuffled)
    a, b = MaxCalibrator(), MaxCalibrator()
    cut = rnd.randint(0, len(shuffled))
    for t in shuffled[:cut]:
        a.collect(t)
    for t in shuffled[cut:]:
        b.collect(t)
    b.merge(a)
    _assert_same_state(b, whole)
    assert whole.compute_range()[1] == max(max(x) for x in batches)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
