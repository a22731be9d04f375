"""The recurrent loop's gemv on W_hh re-laid out 4 rows at a time (``int8_pack_rows4``, the AVX2 loop).

- The layout is what gemv.cpp's comment says: rows in groups of 4 (zero rows pad the last group), K
  padded to a multiple of 16 with zeros, per group and 16 columns the 16 bytes of each row in turn
  (checked against a torch re-layout).
- ``rnn_layer`` with the packed weight gives the bits of ``rnn_layer`` on the plain weight (whose sums
  the other recurrent tests hold to the reference): every mode and activation grid, hidden sizes that
  are not multiples of 4 / 16 / 32 (a 4-row group then straddles two gates or two threads), batches
  1 / 2 / 3 / 9 (activation rows 2 at a time, an odd batch ends on one), forwards and reversed, 1 and 2
  threads.
- ``int8_gemv`` with the packed weight (its ``w_packed`` option) gives the plain ``int8_gemv``'s bits.
- The models run it: `recurrent_native` passes the cached packed weight on AVX2 builds, and an in-place
  change of W_hh is followed (the cache keys on the tensor's version).
"""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import native
from quanta.kernels import recurrent_native as RN
from quanta.kernels.gemv_rows import gemv_isa
from quanta.kernels.recurrent import dynamic_int8_rnn
from quanta.kernels.recurrent_math import act_spec

needs_native_loop = pytest.mark.skipif("native" not in dynamic_int8_rnn.available_impls(),
                                       reason=f"no native recurrent loop here (gemv loop: {gemv_isa()})")

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
ACTS = {"s8sym": (8, True, True, False), "u8asym": (8, False, False, False), "s8asym": (8, True, False, False)}


def _packed_reference(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    n4, k16 = (n + 3) // 4 * 4, (k + 15) // 16 * 16
    padded = torch.zeros(n4, k16, dtype=torch.int8)
    padded[:n, :k] = w
    # [groups, 4 rows, K/16 blocks, 16] -> [groups, blocks, 4 rows, 16]
    return padded.reshape(n4 // 4, 4, k16 // 16, 16).permute(0, 2, 1, 3).reshape(-1)


@needs_native_loop
@pytest.mark.parametrize("shape", [(1, 1), (4, 16), (5, 17), (160, 40), (300, 100), (7, 33)])
def test_pack_rows4_layout(shape):
    w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(native.module().int8_pack_rows4(w), _packed_reference(w))


@needs_native_loop
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", list(GATES))
def test_packed_loop_gives_the_plain_loops_bits(mode, act, torch_threads, rnn_layer_case):
    spec = act_spec(*ACTS[act])
    lib = native.module()
    for batch, hidden in ((1, 40), (3, 100), (9, 33), (1, 21), (2, 64), (4, 18)):
        gi, state, w, s, b = rnn_layer_case(mode, batch, hidden, seed=batch * 1000 + hidden, steps=7)
        w_sum, packed = lib.int8_row_sums(w), lib.int8_pack_rows4(w)
        args = (mode, gi, state, w, s, b, w_sum, spec.qmin, spec.qmax, spec.symmetric, spec.signed, hidden % 2 == 1)
        plain = lib.rnn_layer(*args)
        for n in (1, 2):
            with torch_threads(n):
                got = lib.rnn_layer(*args, packed)
            for x, y in zip(plain, got):
                assert torch.equal(x, y), (mode, act, batch, hidden, n)


@needs_native_loop
@pytest.mark.parametrize("xdtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("m,n,k", [(1, 8, 16), (2, 33, 70), (3, 130, 17), (5, 96, 512), (64, 2048, 512)])
def test_packed_gemv_gives_the_plain_gemvs_bits(m, n, k, xdtype, torch_threads):
    gen = torch.Generator().manual_seed(m * n + k)
    lo, hi = (0, 256) if xdtype == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (m, k), generator=gen).to(xdtype)
    x[0] = hi - 1  # the extremes: every code at its top against weights of -128
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    w[0] = -128
    lib = native.module()
    args = (x, torch.randint(lo, hi, (m,), generator=gen).int(), w, lib.int8_row_sums(w), torch.rand(m) + 0.5,
            torch.rand(n) * 0.01, torch.randn(n))
    plain = lib.int8_gemv(*args)
    for threads in (1, 2):
        with torch_threads(threads):
            assert torch.equal(lib.int8_gemv(*args, w_packed=lib.int8_pack_rows4(w)), plain), (m, n, k, threads)


@needs_native_loop
def test_packed_weight_is_checked(rnn_layer_case):
    gi, state, w, s, b = rnn_layer_case("GRU", 1, 40, seed=1)
    lib = native.module()
    with pytest.raises(RuntimeError, match="w_packed must be int8_pack_rows4"):
        lib.rnn_layer("GRU", gi, state, w, s, b, lib.int8_row_sums(w), 0, 255, False, False, False, w.reshape(-1))
    with pytest.raises(RuntimeError, match="w_packed must be int8_pack_rows4"):
        lib.int8_gemv(torch.zeros(1, 40, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32), w, lib.int8_row_sums(w),
                      torch.ones(1), torch.ones(120), None, w_packed=w[:8])


@needs_native_loop
def test_models_use_the_cached_packed_weight_and_follow_inplace_changes():
    w = torch.randint(-128, 128, (4 * 24, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    first = RN._packed_rows4(w)
    if gemv_isa() != "avx2":
        assert first is None
        return
    assert RN._packed_rows4(w) is first  # cached
    w[5] = 7
    again = RN._packed_rows4(w)
    assert again is not first and torch.equal(again, _packed_reference(w))
