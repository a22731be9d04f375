"""The codes ops (`quanta.kernels.codes`): every native implementation bit for bit its readable
reference (odd shapes, memory orders, ties at .5, values beyond the clamp), the reference equal to
`quanta.core.quantize`, each guard's refusal, and the modules that call them counting what ran."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.core import QuantSpec, quantize
from quanta.integer.add import Int8Add
from quanta.integer.pooling import CodesMaxPool2d
from quanta.kernels import native
from quanta.kernels.codes import add_codes, max_pool2d_codes, quantize_codes

needs_native = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")
CL = torch.channels_last


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)  # (a size-1 dim's stride is arbitrary)


def _same(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape, memory order and bits (float32 compared as its bit patterns)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape and _strides(got) == _strides(ref), \
        (got.dtype, ref.dtype, got.shape, got.stride(), ref.stride())
    assert torch.equal(_bits(got), _bits(ref))


def _floats(shape, inv: float, seed: int) -> torch.Tensor:
    """Random values, plus exact ties at .5 on the grid, zeros, and values far beyond the clamp."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (200.0 / inv)
    flat = x.view(-1)
    n = flat.numel()
    ties = (torch.randint(-300, 300, (n,), generator=g).float() + 0.5) / inv
    pick = torch.randint(0, 4, (n,), generator=g)
    flat[pick == 0] = ties[pick == 0]
    flat[pick == 1] = torch.tensor([0.0, -0.0, 3e38, -3e38, float("inf"), -float("inf")])[
        torch.randint(0, 6, (int((pick == 1).sum()),), generator=g)]
    return x


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=CL)
    if layout == "strided":  # not dense: every other element of the last dim
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x


# ---------------------------------------------------------------------------- quantize_codes
@needs_native
@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), layout=st.sampled_from(["contiguous",
       "channels_last"]), inv=st.sampled_from([0.25, 1.0, 4.0, 0.37, 13.3]), zp=st.integers(0, 255),
       signed=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quantize_codes_native_is_the_reference(shape, layout, inv, zp, signed, channels_last, seed):
    x = _layout(_floats(shape, inv, seed), layout)
    channels_last = channels_last and x.dim() == 4 and not signed
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = zp - 128 if signed else zp
    args = (x, inv, zp, qmin, qmax, signed, channels_last)
    assert quantize_codes.choose(*args) == "native"
    ref = quantize_codes(*args, impl="reference")
    _same(quantize_codes(*args, impl="native"), ref)
    if channels_last:
        assert ref.is_contiguous(memory_format=CL)


def test_quantize_codes_reference_is_quanta_core_quantize():
    """The one readable clamp(round(x · inv) + zp) gives `quanta.core.quantize`'s codes, the
    reciprocal taken in float32 (ties included: a million values)."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    for scale, zp in ((0.0173, 37), (0.25, 0), (3.1, 250)):
        s = torch.tensor(scale)
        x = _floats((1000, 1000), 1 / scale, 0)
        inv = float(torch.reciprocal(s))
        got = quantize_codes(x, inv, zp, 0, 255, False, False, impl="reference")
        assert torch.equal(got, quantize(x, s, torch.tensor(zp, dtype=torch.int32), spec))


def test_quantize_codes_takes_half_precision_and_strided_inputs_through_the_reference():
    x = _floats((2, 3, 5, 4), 2.0, 1)
    for t in (x.half(), x.bfloat16(), _layout(x, "strided")):
        args = (t, 2.0, 9, 0, 255, False, True)
        assert quantize_codes.choose(*args) == "reference"
        got = quantize_codes(*args)
        assert got.is_contiguous(memory_format=CL)
        assert torch.equal(got, quantize_codes(t.float().contiguous(), 2.0, 9, 0, 255, False, False))


@needs_native
@pytest.mark.parametrize("args,reason", [
    (lambda x: (x.half(), 1.0, 0, 0, 255, False, False), "float32 on the CPU"),
    (lambda x: (_layout(x, "strided"), 1.0, 0, 0, 255, False, False), "neither contiguous nor channels-last"),
    (lambda x: (x, 1.0, 0, -128, 127, True, True), "channels-last codes"),
    (lambda x: (x[0], 1.0, 0, 0, 255, False, True), "channels-last codes"),
], ids=["half", "strided", "signed-channels-last", "3d-channels-last"])
def test_quantize_codes_guard_refuses(args, reason):
    a = args(torch.randn(2, 3, 4, 5))
    assert quantize_codes.choose(*a) == "reference"
    with pytest.raises(ValueError, match=reason):
        quantize_codes(*a, impl="native")


@pytest.mark.parametrize("args,match", [
    ((1.0, 0, 0, 256, False, False), r"\[qmin, qmax\] = \[0, 256\] must lie in \[0, 255\]"),
    ((1.0, 0, -129, 0, True, False), r"must lie in \[-128, 127\]"),
    ((1.0, 0, 0, 255, False, True), "channels_last needs a 4-D input"),
])
def test_quantize_codes_reference_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        quantize_codes(torch.randn(3, 4), *args, impl="reference")


# ---------------------------------------------------------------------------- add_codes
@needs_native
@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), layout=st.sampled_from(["contiguous",
       "channels_last"]), post_op=st.sampled_from(["none", "relu", "relu6"]),
       out_inv=st.sampled_from([None, 1.0, 8.0, 37.7]), za=st.integers(0, 255), zo=st.integers(0, 255),
       lo_hi=st.sampled_from([(0, 255), (3, 200)]), seed=st.integers(0, 2**31 - 1))
def test_add_codes_native_is_the_reference(shape, layout, post_op, out_inv, za, zo, lo_hi, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = (_layout(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), layout) for _ in range(2))
    args = (a, 0.0371, za, b, 0.125, 128, post_op, out_inv, zo, *lo_hi)
    assert add_codes.choose(*args) == "native"
    _same(add_codes(*args, impl="native"), add_codes(*args, impl="reference"))


@needs_native
def test_add_codes_ties_round_half_to_even_in_both():
    """Sums exactly halfway between two output codes (inv = 2: y = k / 4 lands on .5 for odd k)."""
    a = torch.arange(256, dtype=torch.uint8).repeat(64)
    b = torch.arange(256, dtype=torch.uint8).repeat_interleave(64)
    args = (a, 0.25, 0, b, 0.25, 128, "none", 2.0, 100, 0, 255)
    got = add_codes(*args, impl="native")
    _same(got, add_codes(*args, impl="reference"))
    y = (a.float() + b.float() - 128) * 0.25 * 2.0
    assert torch.equal(got.float(), (torch.round(y) + 100).clamp(0, 255))  # (round: half to even)


@needs_native
@pytest.mark.parametrize("change,reason", [
    (lambda a, b: (a, b.contiguous()), "memory orders"),
    (lambda a, b: (a, b[:, :, :2]), "different shapes"),
    (lambda a, b: (a.view(torch.int8), b.view(torch.int8)), "native: uint8"),
], ids=["memory-order", "shape", "int8"])
def test_add_codes_guard_refuses(change, reason):
    a = torch.randint(0, 256, (2, 4, 3, 3), dtype=torch.uint8).contiguous(memory_format=CL)
    a2, b2 = change(a, a.clone().contiguous(memory_format=CL))
    args = (a2, 0.1, 3, b2, 0.2, 4, "relu", None, 0, 0, 255)
    assert add_codes.choose(*args) == "reference"
    with pytest.raises(ValueError, match=reason):
        add_codes(*args, impl="native")


def test_add_codes_reference_refuses_bad_arguments():
    a = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="post_op must be one of"):
        add_codes(a, 0.1, 0, a, 0.1, 0, "gelu", None, 0, 0, 255, impl="reference")
    with pytest.raises(ValueError, match="out_inv must be positive"):
        add_codes(a, 0.1, 0, a, 0.1, 0, "none", -1.0, 0, 0, 255, impl="reference")
    with pytest.raises(TypeError, match="needs uint8 codes"):
        add_codes(a.float(), 0.1, 0, a, 0.1, 0, "none", None, 0, 0, 255, impl="reference")


# ---------------------------------------------------------------------------- max_pool2d_codes
@needs_native
def test_max_pool2d_codes_of_a_one_pixel_channels_last_image_stay_channels_last():
    """A 1x1 channels-last image is contiguous both ways: the reference pooled it into NCHW codes
    where the native kernel writes channels-last ones (found by the hypothesis test below)."""
    x = torch.tensor([172, 47], dtype=torch.uint8).reshape(1, 2, 1, 1).contiguous(memory_format=CL)
    args = (x, [2, 1], [1, 1], [1, 0], [1, 1], False)
    ref = max_pool2d_codes(*args, impl="reference")
    assert ref.is_contiguous(memory_format=CL) and ref.shape == (1, 2, 2, 1)
    _same(max_pool2d_codes(*args, impl="native"), ref)


@needs_native
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 70), h=st.integers(1, 12), w=st.integers(1, 12),
       k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       p=st.tuples(st.integers(0, 2), st.integers(0, 2)), d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       seed=st.integers(0, 2**31 - 1))
def test_max_pool2d_codes_native_is_the_reference(n, c, h, w, k, s, p, d, seed):
    p = tuple(min(pi, ki // 2) for pi, ki in zip(p, k))
    if any(size + 2 * pi - di * (ki - 1) - 1 < 0 for size, pi, di, ki in zip((h, w), p, d, k)):
        return  # (an empty output: torch refuses it too)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    args = (x, list(k), list(s), list(p), list(d), False)
    ref = max_pool2d_codes(*args, impl="reference")
    if max_pool2d_codes.choose(*args) == "native":
        _same(max_pool2d_codes(*args, impl="native"), ref)
    # pooling commutes with the (monotone) quantization: the codes of the pooled values
    pooled = F.max_pool2d(x.float(), list(k), list(s), list(p), list(d))
    assert torch.equal(ref.float(), pooled.clamp_min(0))  # (a window wholly in padding: the lowest code, 0)


@needs_native
@pytest.mark.parametrize("x,args,reason", [
    (lambda x: x.contiguous(), ([2, 2], [2, 2], [0, 0], [1, 1], False), "channels-last uint8"),
    (lambda x: x.view(torch.int8), ([2, 2], [2, 2], [0, 0], [1, 1], False), "channels-last uint8"),
    (lambda x: x, ([2, 2], [2, 2], [0, 0], [1, 1], True), "ceil_mode"),
    (lambda x: x, ([2, 2], [2, 2], [2, 0], [1, 1], False), "padding at most half the kernel"),
], ids=["contiguous", "int8", "ceil", "padding"])
def test_max_pool2d_codes_guard_refuses(x, args, reason):
    a = (x(torch.randint(0, 256, (1, 4, 4, 4), dtype=torch.uint8).contiguous(memory_format=CL)), *args)
    assert max_pool2d_codes.choose(*a) == "reference"
    with pytest.raises(ValueError, match=reason):
        max_pool2d_codes(*a, impl="native")


@needs_native
def test_codes_max_pool_with_a_window_wholly_in_padding_runs_native():
    """A dilated window can miss the input entirely (kernel 2, dilation 5, padding 1 on 4 x 4): the
    native kernel writes the lowest code there (tests/kernels/test_codes_max_pool_empty_window.py)."""
    pool = CodesMaxPool2d(2, stride=1, padding=1, dilation=5)
    x = torch.randint(0, 256, (1, 4, 4, 4), dtype=torch.uint8).contiguous(memory_format=CL)
    assert torch.equal(pool(x).float(), F.max_pool2d(x.float(), 2, 1, 1, 5).clamp_min(0))
    assert pool.kernel_counts == {"native": 1}


# ---------------------------------------------------------------------------- the modules' counts
@needs_native
def test_modules_count_the_implementation_that_ran():
    pool = CodesMaxPool2d(3, stride=2, padding=1)
    x = torch.randint(0, 256, (2, 8, 9, 9), dtype=torch.uint8)
    pool(x.contiguous(memory_format=CL))
    pool(x.contiguous(memory_format=CL))
    pool(x)  # contiguous codes: the reference
    assert pool.kernel_counts == {"native": 2, "reference": 1}
    assert torch.equal(pool(x), pool(x.contiguous(memory_format=CL)))

    add = Int8Add()
    a = torch.randint(0, 256, (2, 8, 5, 5), dtype=torch.uint8)
    add(a, a)
    add(a, a.contiguous(memory_format=CL))
    assert add.kernel_counts == {"native": 1, "reference": 1}
    add.impl = "reference"
    add(a, a)
    assert add.kernel_counts == {"native": 1, "reference": 2}


def test_the_fakes_state_the_real_outputs():
    """Each op's fake kernel (its reference, on fake tensors) gives the real output's shape, dtype
    and strides (torch.library.opcheck runs both)."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 8, 9, 7), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    x = torch.randn(2, 3, 5, 7, generator=g)
    impl = "native" if native.ready() else "reference"
    cases = [(torch.ops.quanta.quantize_codes.default, (x, 0.5, 3, 0, 255, False, True, impl)),
             (torch.ops.quanta.quantize_codes.default, (x.contiguous(memory_format=CL), 0.5, 0, -128, 127, True,
                                                        False, impl)),
             (torch.ops.quanta.add_codes.default, (u8, 0.1, 3, u8.clone(), 0.2, 5, "relu6", 4.0, 2, 0, 255, impl)),
             (torch.ops.quanta.add_codes.default, (u8, 0.1, 3, u8.clone(), 0.2, 5, "none", None, 0, 0, 255, impl)),
             (torch.ops.quanta.max_pool2d_codes.default, (u8, [3, 3], [2, 2], [1, 1], [1, 1], False, impl))]
    for op, args in cases:
        result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@needs_native
def test_settled_add_and_pool_calls_keep_the_first_calls_numbers_and_are_forgotten_when_stale():
    """A module's second call of a signature is its settled kernel (one lookup): same bits as the
    first call and as the reference; set_output forgets it; copies settle their own."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 256, (2, 8, 5, 5), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    x = torch.randn(2, 8, 5, 5, generator=g).contiguous(memory_format=CL) * 3
    add, ref = Int8Add(), Int8Add()
    ref.impl = "reference"
    for m in (add, ref):
        m.set_output("uint8", 0.05, 3, post_op="relu")
    first = add(a, x)  # codes and a float operand
    assert len(add.binding.calls) == 1 and torch.equal(add(a, x), first) and torch.equal(ref(a, x), first)
    assert add.kernel_counts == {"native": 2}
    add.set_output("float")
    ref.set_output("float")
    assert add.binding.calls == {}
    assert torch.equal(add(a, x), ref(a, x)) and add(a, x).dtype == torch.float32
    twin = copy.deepcopy(add)
    assert twin.binding.calls == {} and torch.equal(twin(a, x), add(a, x))

    pool = CodesMaxPool2d(3, stride=2, padding=1)
    y = pool(a)
    assert torch.equal(pool(a), y) and pool.kernel_counts == {"native": 2}
    for copied in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert copied.kernel_counts == {} and torch.equal(copied(a), y)


@needs_native
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_graph_compiled_before_any_eager_call_runs_the_native_codes_ops():
    """The native implementations are available to a graph traced first (no eager call settled
    anything): one graph, the native operators in it, eager's bits."""
    import torch._dynamo

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add, self.pool = Int8Add(), CodesMaxPool2d(3, stride=2, padding=1)
            self.add.set_output("uint8", 0.05, 3, post_op="relu")

        def forward(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            return self.pool(self.add(x, codes))

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=CL)
    codes = torch.randint(0, 256, (2, 8, 9, 9), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    torch._dynamo.reset()
    block = Block()
    with torch.inference_mode():
        compiled = torch.compile(block)
        got = compiled(x, codes)
        compiled(x, codes)  # (the first call built the modules' runtime form: the graph is traced again once)
        with torch.profiler.profile() as prof:
            compiled(x, codes)
        assert torch._dynamo.explain(block)(x, codes).graph_break_count == 0  # (built by the first call)
        expected = block(x, codes)
    ops = [e.name for e in prof.events()]
    for op in ("quantize_static", "add_codes", "max_pool2d_codes"):
        assert ops.count(f"quanta_native::{op}") == 1, (op, sorted(set(ops)))
    assert torch.equal(got, expected)
