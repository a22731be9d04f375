"""Tier 1: the fast recurrent implementations against the reference.

``int_mm`` (signed symmetric activations) must be bit-identical to the reference. ``native`` (any
grid; the C++ time loop) computes the same codes and integer sums, but its gate functions are
SLEEF's (torch's own vector routines) where ATen may round an ulp differently: it is held to the
same bound as ``fbgemm`` (measured: max |diff| 2.4e-7 without a flip). ``fbgemm``
(unsigned asymmetric activations, fbgemm's own quantization) agrees to float rounding: the
bound is 1e-5 in |diff| / (1 + |ref|) (measured: 4e-6), except where fbgemm and quanta round one
hidden-state code differently (a tie or a last-ulp scale difference) and the flip propagates
through the following steps. Measured over 40 seeds x every case (960 outputs): 3% flip, worst
max 0.115, worst mean 0.0055; the bound is max 0.2, mean 0.01 (a wrong kernel gives means of
order 0.1-1). Seeds are deterministic (crc32 of the case), not Python's per-process hash().
"""

from __future__ import annotations

import zlib

import pytest
import torch

from quanta.core import choose_qparams, compute_range, quantize
from quanta.kernels import recurrent as R
from quanta.kernels.gemv_rows import gemv_isa

FBGEMM_ATOL = 1e-5
ACTS = {"s8sym": (8, True, True, False), "u8asym": (8, False, False, False), "u7asym": (7, False, False, False)}


def _weights(mode: str, i: int, h: int, layers: int, dirs: int, gen: torch.Generator) -> list[torch.Tensor]:
    g, out = R.GATES[mode], []
    for layer in range(layers):
        for _ in range(dirs):
            for cols in (i if layer == 0 else h * dirs, h):
                out += [torch.randint(-127, 128, (g * h, cols), dtype=torch.int8, generator=gen),
                        torch.rand(g * h, generator=gen) * 0.02 + 1e-3, torch.randn(g * h, generator=gen) * 0.1]
    return out


def _close(ref: list[torch.Tensor], fast: list[torch.Tensor], impl: str) -> None:
    for r, f in zip(ref, fast):
        if impl in EXACT:
            assert torch.equal(f, r)
            continue
        d = (f - r).abs() / (1 + r.abs())
        # float rounding only (<= 1e-5), or a rare one-code flip of a requantized h (fbgemm
        # rounds nearbyint(x / s + z) with a double scale): one step ~ 1/127 of h's range.
        assert float(d.max()) <= FBGEMM_ATOL or (float(d.max()) <= 0.2 and float(d.mean()) <= 1e-2), \
            (float(d.max()), float(d.mean()))


EXACT = ("int_mm",)


def _impls(act: str) -> list[str]:
    """The implementations whose guards accept this activation grid, fastest first."""
    return ["native", "int_mm" if act == "s8sym" else "fbgemm"]


def _runs_here(impl: str, act: str) -> bool:
    """Whether ``impl`` runs this activation grid on this machine: without VNNI fbgemm's int16
    pair sums saturate on full-range 8-bit codes, so its guard refuses them (7-bit ones run)."""
    op = R.dynamic_int8_rnn
    return op.why_not_available(impl) is None and not (impl == "fbgemm" and ACTS[act][0] == 8
                                                      and not R.FBGEMM_SATURATION.exact())


def _skip_unless_runs(impl: str, act: str) -> None:
    if R.dynamic_int8_rnn.why_not_available(impl) is not None:
        pytest.skip(f"{impl} is not available here: {R.dynamic_int8_rnn.why_not_available(impl)}")
    if not _runs_here(impl, act):
        pytest.skip(f"{impl} refuses {act} here: {R.FBGEMM_SATURATION.reason()}")


CASES = [  # mode, input, hidden, layers, bidirectional, batch, time
    ("LSTM", 5, 7, 1, False, 1, 9), ("LSTM", 3, 33, 2, True, 4, 5), ("GRU", 6, 7, 2, False, 1, 6),
    ("GRU", 4, 33, 1, True, 3, 4), ("RNN_TANH", 5, 7, 2, True, 2, 5), ("RNN_RELU", 4, 33, 1, False, 1, 7),
]


@pytest.mark.parametrize("which", [0, 1], ids=["native", "other"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[2]}-L{c[3]}-{'bi' if c[4] else 'uni'}-b{c[5]}")
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
def test_sequence_fast_matches_reference(case, act, batch_first, which):
    mode, i, h, layers, bi, b, t = case
    if act == "u7asym" and mode.startswith("RNN"):
        pytest.skip("covered by u8asym (a 7-bit tie flip in the tanh case makes a bound meaningless)")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()) % 1000)
    dirs = 2 if bi else 1
    w = _weights(mode, i, h, layers, dirs, gen)
    x = torch.randn((b, t, i) if batch_first else (t, b, i), generator=gen)
    hx = [torch.randn(layers * dirs, b, h, generator=gen) * 0.5 for _ in range(2 if mode == "LSTM" else 1)]
    args = (mode, x, hx, w, layers, bi, batch_first, *ACTS[act])
    impl = _impls(act)[which]
    _skip_unless_runs(impl, act)
    assert R.dynamic_int8_rnn.choose(*args) == next(i for i in _impls(act) if _runs_here(i, act))
    ref, fast = R.dynamic_int8_rnn(*args, impl="reference"), R.dynamic_int8_rnn(*args, impl=impl)
    assert [r.shape for r in ref] == [f.shape for f in fast]
    assert ref[0].shape == ((b, t, h * dirs) if batch_first else (t, b, h * dirs))
    _close(ref, fast, impl)


@pytest.mark.parametrize("which", [0, 1], ids=["native", "other"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 33, 33)], ids=["b1-h7", "b3-h33"])
def test_cell_fast_matches_reference(mode, act, shape, which):
    b, i, h = shape
    gen = torch.Generator().manual_seed(7)
    w = _weights(mode, i, h, 1, 1, gen)
    x = torch.randn(b, i, generator=gen)
    hx = [torch.randn(b, h, generator=gen) * 0.5 for _ in range(2 if mode == "LSTM" else 1)]
    impl = _impls(act)[which]
    _skip_unless_runs(impl, act)
    ref = R.dynamic_int8_rnn_cell(mode, x, hx, w, *ACTS[act], impl="reference")
    fast = R.dynamic_int8_rnn_cell(mode, x, hx, w, *ACTS[act], impl=impl)
    _close(ref, fast, impl)


@pytest.mark.parametrize("act", ["s8sym", "u8asym"])
def test_integer_gate_sums_exact(act):
    """The int32 sums: reference (float64) == int_mm == the exact int64 product of the codes;
    and fbgemm's linear_dynamic output equals acc * s_x * s_w to float rounding."""
    gen = torch.Generator().manual_seed(3)
    spec = R.act_spec(*ACTS[act])
    for m, k, n in ((1, 7, 28), (4, 33, 132), (2, 512, 2048), (3, 1, 8)):  # k=1: a torch _int_mm bug
        x = torch.randn(m, k, generator=gen) * 3
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s_w = torch.rand(n, generator=gen) * 0.01 + 1e-3
        _, acc = R.qlinear(x, w, s_w, torch.zeros(n), spec, R.exact_matmul)
        lo, hi = compute_range(x, spec)
        s_x, z_x = choose_qparams(lo, hi, spec)
        q = quantize(x, s_x, z_x, spec).long() - int(z_x)
        assert torch.equal(acc.long(), q @ w.long().t())
        if act == "s8sym":
            assert torch.equal(R.qlinear(x, w, s_w, torch.zeros(n), spec, R.int_mm_matmul)[1], acc)
        elif _runs_here("fbgemm", act):
            packed = R.prepack([w, s_w, torch.zeros(n), w, s_w, torch.zeros(n)], "cell", False)[0][0]
            y = torch.ops.quantized.linear_dynamic(x, packed, False)
            torch.testing.assert_close(y.double(), acc.double() * s_x.double() * s_w.double(), rtol=1e-5, atol=1e-5)
        elif R.fbgemm_available():  # its sums saturate here: the guard refuses full-range 8-bit codes
            assert R.FBGEMM_SATURATION.reason() in R._fbgemm_guard_act(*ACTS[act])


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("threads", [2, 3])
def test_native_threads_split_the_hidden_units_with_the_same_bits(mode, threads):
    """The C++ loop splits the hidden units between threads (slices of 16; the range of h is
    merged exactly): any thread count gives the single-thread bits, for every remainder of H."""
    if "native" not in R.dynamic_int8_rnn.available_impls():
        pytest.skip("native is not available here")
    before = torch.get_num_threads()
    for h in (7, 17, 33, 50, 64):
        gen = torch.Generator().manual_seed(h)
        w = _weights(mode, 5, h, 2, 2, gen)
        hx = [torch.randn(4, 3, h, generator=gen) * 0.5 for _ in range(2 if mode == "LSTM" else 1)]
        args = (mode, torch.randn(6, 3, 5, generator=gen), hx, w, 2, True, False, 8, False, False, False)
        try:
            torch.set_num_threads(1)
            one = R.dynamic_int8_rnn(*args, impl="native")
            torch.set_num_threads(threads)
            many = R.dynamic_int8_rnn(*args, impl="native")
        finally:
            torch.set_num_threads(before)
        assert all(torch.equal(a, b) for a, b in zip(one, many)), (mode, threads, h)
        _close(R.dynamic_int8_rnn(*args, impl="reference"), many, "native")


def test_native_leaves_the_state_untouched():
    """The C++ loop updates its own copies of h / c, never the caller's tensors."""
    if "native" not in R.dynamic_int8_rnn.available_impls():
        pytest.skip("native is not available here")
    gen = torch.Generator().manual_seed(5)
    w = _weights("LSTM", 4, 32, 1, 1, gen)
    hx = [torch.randn(1, 2, 32, generator=gen) for _ in range(2)]
    before = [t.clone() for t in hx]
    x = torch.randn(6, 2, 4, generator=gen)
    out = R.dynamic_int8_rnn("LSTM", x, hx, w, 1, False, False, 8, False, False, False, impl="native")
    assert all(torch.equal(a, b) for a, b in zip(hx, before))
    assert not torch.equal(out[1], hx[0]) and not torch.equal(out[2], hx[1])


def test_guards_refuse_and_explain():
    gen = torch.Generator().manual_seed(0)
    w = _weights("LSTM", 3, 5, 1, 1, gen)
    args = ("LSTM", torch.randn(2, 1, 3), [torch.zeros(1, 1, 5)] * 2, w, 1, False, False, 8, True, True, False)
    with pytest.raises(ValueError, match="unsigned asymmetric"):
        R.dynamic_int8_rnn(*args, impl="fbgemm")
    args_asym_signed = args[:-4] + (8, True, False, False)
    assert R.dynamic_int8_rnn.choose(*args_asym_signed) in ("native", "reference")
    with pytest.raises(ValueError, match="signed symmetric"):
        R.dynamic_int8_rnn(*args_asym_signed, impl="int_mm")
    many = ("LSTM", torch.randn(2, 9, 3), [torch.zeros(1, 9, 5)] * 2, w, 1, False, False, 8, False, False, False)
    if "native" in R.dynamic_int8_rnn.available_impls() and gemv_isa() == "avx512_vnni":
        # many sequences: each step is a GEMM, fbgemm's job
        assert R.dynamic_int8_rnn.choose(*many) == ("fbgemm" if R.FBGEMM_SATURATION.exact() else "reference")
        with pytest.raises(ValueError, match="batch 9 > 8"):
            R.dynamic_int8_rnn(*many, impl="native")
    elif "native" in R.dynamic_int8_rnn.available_impls():
        # without VNNI fbgemm's 8-bit pair sums saturate and the native loop reads each weight block once
        # per step for all sequences: it takes any batch
        assert R.dynamic_int8_rnn.choose(*many) == "native"
    with pytest.raises(ValueError, match="unknown recurrent mode"):
        R.dynamic_int8_rnn("LSTMX", *args[1:], impl="reference")
    with pytest.raises(ValueError, match="6 per layer"):
        R.dynamic_int8_rnn("LSTM", args[1], args[2], w[:5], *args[4:], impl="reference")
    with pytest.raises(TypeError, match="float32"):
        R.dynamic_int8_rnn("LSTM", args[1].double(), *args[2:], impl="reference")
