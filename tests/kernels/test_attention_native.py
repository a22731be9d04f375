"""The native float attention (`quanta.kernels.attention_float`, ``csrc/attention.cpp``) against the
torch ops it replaces: within float32 rounding on every shape the kernel takes (tails of keys, rows
and value columns, strided views, broadcast masks), torch's NaN behaviour, independent of the thread
count, the reference's gradients, and the reference itself wherever the kernel cannot take the inputs."""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import native
from quanta.kernels.attention_float import attention, native_inputs, reference

pytestmark = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")


def _qkv(b, h, lq, lk, d, dv, seed=0, views=True):
    g = torch.Generator().manual_seed(seed)
    if views:  # [B, L, H, D] -> [B, H, L, D], as a user's _split makes them
        return (torch.randn(b, lq, h, d, generator=g).transpose(1, 2), torch.randn(b, lk, h, d, generator=g).transpose(1, 2),
                torch.randn(b, lk, h, dv, generator=g).transpose(1, 2))
    return torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g), torch.randn(b, h, lk, dv, generator=g)


def _close(a: torch.Tensor, r: torch.Tensor) -> None:
    assert a.shape == r.shape and a.dtype == r.dtype
    torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-6 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4, 6), (1, 12, 128, 128, 32, 32), (2, 2, 33, 17, 64, 64),
                                   (1, 1, 1, 1, 1, 1), (3, 2, 9, 130, 80, 24), (1, 2, 50, 16, 8, 8),
                                   (2, 1, 7, 31, 3, 17)])
@pytest.mark.parametrize("views", [True, False])
def test_equals_the_torch_ops_within_rounding(shape, views):
    q, k, v = _qkv(*shape, views=views)
    b, h, lq, lk = shape[:4]
    masks = [None, torch.randn(b, 1, 1, lk), torch.randn(lq, lk), torch.randn(b, h, lq, lk)]
    for scale in (1.0, 0.125):
        for mask in masks:
            assert native_inputs(q, k, v, mask) is not None
            _close(attention(q, k, v, mask, scale), reference(q, k, v, mask, scale))


def test_three_and_two_dimensional_inputs():
    q, k, v = _qkv(1, 4, 10, 12, 8, 8)
    for t in ((q[0], k[0], v[0]), (q[0, 0], k[0, 0], v[0, 0])):
        _close(attention(*t, None, 0.5), reference(*t, None, 0.5))


def test_nan_as_torch_softmax_gives_it():
    q, k, v = _qkv(1, 2, 4, 5, 8, 8, views=False)
    mask = torch.zeros(1, 1, 4, 5)
    mask[..., 1, :] = float("-inf")  # every key masked: NaN row
    mask[..., 2, 3] = float("-inf")  # one key masked: weight 0
    q2 = q.clone()
    q2[0, 1, 3, 0] = float("nan")
    k2 = k.clone()
    k2[0, 0, 2, 1] = float("inf")
    for args in ((q, k, v, mask), (q2, k, v, None), (q, k2, v, None)):
        got, want = attention(*args, 1.0), reference(*args, 1.0)
        assert torch.equal(got.isnan(), want.isnan())
        _close(torch.nan_to_num(got), torch.nan_to_num(want))


def test_no_keys_and_no_rows():
    q, k, v = _qkv(1, 2, 0, 5, 8, 8, views=False)
    assert attention(q, k, v).shape == (1, 2, 0, 8)
    q, k, v = _qkv(1, 2, 3, 0, 8, 8, views=False)
    assert torch.equal(attention(q, k, v), reference(q, k, v, None, 1.0))  # zeros


def test_independent_of_the_thread_count():
    q, k, v = _qkv(2, 6, 100, 100, 32, 32)
    mask = torch.randn(2, 1, 1, 100)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention(q, k, v, mask, 0.2)
        torch.set_num_threads(2)
        two = attention(q, k, v, mask, 0.2)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_gradients_are_the_reference_ops():
    q, k, v = (t.clone().requires_grad_() for t in _qkv(2, 2, 6, 9, 8, 4, views=False))
    mask = torch.randn(1, 2, 1, 9, requires_grad=True)  # a learned bias: it gets a gradient too
    out = attention(q, k, v, mask, 0.3)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, mask), g)
    want = torch.autograd.grad(reference(q, k, v, mask, 0.3), (q, k, v, mask), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _close(attention(q, k, v, mask, 0.3), out.detach())


@pytest.mark.parametrize("case", ["float64", "broadcast batch", "int mask", "mask too wide"])
def test_the_reference_where_the_kernel_cannot_take_the_inputs(case):
    q, k, v = _qkv(2, 2, 4, 6, 8, 8, views=False)
    mask = None
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "broadcast batch":
        k, v = k[:1], v[:1]  # matmul broadcasts [1, H, ...] against [2, H, ...]
    elif case == "int mask":
        mask = torch.ones(6, dtype=torch.int64)
    else:
        mask = torch.zeros(3, 2, 2, 4, 6)
    assert native_inputs(q, k, v, mask) is None
    assert torch.equal(attention(q, k, v, mask, 0.5), reference(q, k, v, mask, 0.5))


def test_compiled_graphs_call_the_kernel():
    q, k, v = _qkv(2, 3, 10, 12, 8, 8)
    mask = torch.randn(2, 1, 1, 12)
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, m, 0.25), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v, mask), attention(q, k, v, mask, 0.25))
