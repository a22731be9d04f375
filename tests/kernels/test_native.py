"""Tier 1 for the native fused kernels: bit-identical to quanta.core and to the PyTorch paths.

conftest loads the library; on a Linux machine with a C++ compiler it must be there (a build
that silently fails would otherwise leave these tests skipped and the speed gone)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.core import QuantSpec, quantize, quantize_tensor
from quanta.kernels import activation as A
from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.gemv_rows import gemv_max_rows

BUILDABLE = (platform.system() == "Linux" and shutil.which(os.environ.get("CXX", "c++")) is not None
             and os.environ.get(native.ENV_SWITCH, "1") not in ("0", "off", "false", "no"))
#: what a Linear of more rows than the gemv takes runs (conftest loads the native kernels)
_MM = "gemm_native" if native.ready() and native.module().gemv_has_vnni() else "int_mm_native"
if "float_sums" in L.int8_linear.available_impls():  # no VNNI: exact float32 GEMMs on the codes run instead
    _MM = "float_sums"
#: what the 9-row inputs below run: the native gemv where it takes 9 rows (AVX2 without VNNI: up to
#: 32, `quanta.kernels.gemv_rows`), else `_MM`
_NINE = "gemv_native" if gemv_max_rows(96, 64) >= 9 else _MM
needs_native = pytest.mark.skipif(not native.ready(), reason=f"native kernels not loaded: {native.status()}")


def test_native_kernels_load_where_a_compiler_is():
    if not BUILDABLE:
        pytest.skip("no C++ compiler, not Linux, or disabled: the PyTorch implementations run")
    assert native.ready(), native.status()
    assert native.status() == "loaded"


def _rows(seed: int, M: int, K: int, scale_exp: int, positive: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10.0 ** scale_exp
    if positive:
        x = x.abs()
    if M > 1:
        x[-1] = 0.0  # an all-zero row: scale 1, zero point at qmin / 0
    if K >= 4:  # exact ties in scale units somewhere
        x[0, :4] = torch.tensor([-2.5, 0.5, 1.5, 3.5]) * (x[0].abs().max() / 127 + 1e-3)
    return x


@needs_native
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 40), K=st.integers(1, 300), scale_exp=st.integers(-4, 3),
       positive=st.booleans(), bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans(),
       narrow=st.booleans())
def test_native_per_token_quantization_equals_core(seed, M, K, scale_exp, positive, bits, signed, symmetric, narrow):
    if symmetric and not signed:
        signed = True
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow and signed,
                     granularity="per_token")
    x = _rows(seed, M, K, scale_exp, positive)
    ref = quantize_tensor(x, spec)
    assert A.quantize_activation.choose(x, None, None, bits, signed, symmetric, spec.narrow_range, True,
                                        "half_even") == "native"
    codes, s, z = A.quantize_activation_spec(x, spec, impl="native")
    assert codes.dtype == ref.q.dtype and torch.equal(codes, ref.q)
    assert torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)


@needs_native
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(1, 1), (3, 17), (2, 5, 7, 9), (1, 3, 4, 4, 2)]),
       channels_last=st.booleans(), signed=st.booleans(), scale=st.floats(1e-4, 10.0), zp=st.integers(-20, 20))
def test_native_static_quantization_equals_core(seed, shape, channels_last, signed, scale, zp):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    spec = QuantSpec(bits=8, signed=signed, symmetric=False)
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(zp + (0 if signed else 128), dtype=torch.int32)
    ref = quantize(x, s, z, spec)
    inv = float(torch.reciprocal(s))
    codes = native.module().quantize_static(x, inv, int(z), spec.qmin, spec.qmax, signed)
    assert codes.stride() == x.stride()  # memory order kept
    assert torch.equal(codes, ref)


@needs_native
def test_native_static_path_of_the_op_equals_fused():
    x = torch.randn(33, 70) * 5
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    s, z = torch.tensor(0.04), torch.tensor(131, dtype=torch.int32)
    assert A.quantize_activation.choose(x, s, z, 8, False, False, False, False, "half_even") == "native"
    out = A.quantize_activation_spec(x, spec, s, z, impl="native")
    ref = A.quantize_activation_spec(x, spec, s, z, impl="fused")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_quantization_raises_on_non_finite(bad):
    x = torch.randn(5, 64)
    x[3, 17] = bad
    with pytest.raises(ValueError, match="NaN|inf"):
        A.quantize_activation_spec(x, QuantSpec(granularity="per_token", symmetric=False), impl="native")


@needs_native
def test_native_quantization_copes_with_a_range_overflowing_float32():
    x = torch.tensor([[-3e38, 3e38, 1.0, 0.0]])  # width overflows to inf, the values are finite
    spec = QuantSpec(granularity="per_token", symmetric=False, signed=False)
    codes, s, z = A.quantize_activation_spec(x, spec, impl="native")
    ref = quantize_tensor(x, spec)
    assert torch.equal(codes, ref.q) and torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)


@needs_native
def test_native_guard_refusals_fall_back_to_fused():
    choose = A.quantize_activation.choose
    x = torch.randn(16, 8)
    args = (None, None, 8, True, False, False, True, "half_even")
    assert choose(x.t().contiguous().t(), *args) == "fused"  # column-major
    assert choose(x.to(torch.bfloat16), *args) == "fused"
    assert choose(x, None, None, 8, True, False, False, False, "half_even") == "fused"  # dynamic per-tensor
    assert choose(x, None, None, 8, True, False, False, True, "stochastic") == "reference"
    with pytest.raises(ValueError, match="row-major"):
        A.quantize_activation(x.t(), *args, impl="native")


@needs_native
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 20), N=st.integers(1, 70), per_token=st.booleans(),
       with_bias=st.booleans())
def test_native_rescale_equals_python_rescale(seed, M, N, per_token, with_bias):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2**24, 2**24, (M, N), dtype=torch.int32, generator=g)
    n = M if per_token else 1
    zp = torch.randint(-128, 128, (n,), dtype=torch.int32, generator=g)
    w_sum = torch.randint(-2**15, 2**15, (N,), dtype=torch.int32, generator=g)
    xs = torch.rand(n, generator=g) * 0.1 + 1e-4
    ws = torch.rand(N, generator=g) * 0.01 + 1e-5
    bias = torch.randn(N, generator=g) if with_bias else None
    expected = L._rescale(acc - zp.reshape(-1, 1) * w_sum, xs, ws, bias)
    got = native.module().rescale_rows(acc.clone(), zp, w_sum, xs, ws, bias)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@needs_native
def test_native_rescale_rejects_bad_arguments():
    acc = torch.zeros(2, 3, dtype=torch.int32)
    ok = (torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.ones(1), torch.ones(3), None)
    with pytest.raises(RuntimeError, match="acc"):
        native.module().rescale_rows(acc.float(), *ok)
    with pytest.raises(RuntimeError, match="w_scale"):
        native.module().rescale_rows(acc, ok[0], ok[1], ok[2], torch.ones(4), None)
    # int8_gemv shares the epilogue's checks: each argument named, with the size it needs
    lib, x, w = native.module(), torch.zeros(2, 5, dtype=torch.uint8), torch.zeros(3, 5, dtype=torch.int8)
    assert lib.int8_gemv(x, *ok[:1], w, *ok[1:]).shape == (2, 3)
    with pytest.raises(RuntimeError, match="int8_gemv: x_zp .* 1 or 2 values"):
        lib.int8_gemv(x, torch.zeros(3, dtype=torch.int32), w, *ok[1:])
    with pytest.raises(RuntimeError, match="int8_gemv: bias .* 3 values"):
        lib.int8_gemv(x, ok[0], w, ok[1], ok[2], ok[3], torch.ones(2))
    with pytest.raises(RuntimeError, match="int8_gemv: w must be"):
        lib.int8_gemv(x, ok[0], w.float(), *ok[1:])


@needs_native
def test_dynamic_model_runs_the_native_kernels_and_matches_without_them(tmp_path):
    """Structure: a dynamic int8 model of 9-row inputs records ``gemm_native`` (``int_mm_native``
    on a build without VNNI; the AVX2 gemv where it takes 9 rows) and holds the weight packed for it; a process with
    ``QUANTA_NATIVE=0`` runs the PyTorch kernels and produces the same bits, and, where a GELU
    is fused into a Linear (the native epilogue's GELU, not torch's), the same numbers within
    the activation's documented bound."""
    import quanta
    torch.manual_seed(0)
    paths = {}
    x = torch.randn(9, 64)
    torch.save(x, tmp_path / "x.pt")
    ys = {}
    for act in ("relu", "gelu"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU() if act == "relu" else torch.nn.GELU(),
                                    torch.nn.Linear(96, 10)).eval()
        q = quanta.quantize(model, "dynamic_int8", speed_check=False)
        assert q[0].post_op == act and isinstance(q[1], torch.nn.Identity)
        ys[act] = q(x)
        assert {k for m in q.modules() for k in getattr(m, "kernel_counts", {})} == {_NINE}
        assert (q[0]._packed is not None) == (_NINE == "gemm_native")
        paths[act] = tmp_path / f"{act}.quanta"
        quanta.save(q, paths[act])
    code = ("import torch, quanta; from quanta.kernels import native; "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            + "".join(f"m = quanta.load({str(p)!r}); torch.save(m(x), {str(tmp_path / (a + '.pt'))!r}); "
                      for a, p in paths.items())
            + "print(native.status(), sorted({k for s in m.modules() for k in getattr(s, 'kernel_counts', {})}))")
    env = dict(os.environ, QUANTA_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # (no VNNI: float_sums without the native library)
    torch_kernel = "'float_sums'" if "float_sums" in L.int8_linear.available_impls() else "'int_mm'"
    assert "disabled by QUANTA_NATIVE=0" in out.stdout and torch_kernel in out.stdout
    assert torch.equal(torch.load(tmp_path / "relu.pt"), ys["relu"])
    # the GELU's difference (<= 1.5e-6 relative, tests/kernels/test_native_activation.py) can move a
    # dynamic per-token code of the next layer by one step: far below the quantization error
    torch.testing.assert_close(torch.load(tmp_path / "gelu.pt"), ys["gelu"], rtol=0, atol=1e-3 * ys["gelu"].abs().max().item())


@needs_native
@pytest.mark.parametrize("preset", ["dynamic_int8", "static_int8"])
def test_int8_linear_settles_its_native_call_with_the_same_bits(preset):
    """A first eager call settles quantization + GEMM + rescale per input signature; later calls
    give the same bits as the guarded path, a copy or ``pack()`` starts afresh."""
    if _MM == "float_sums":
        pytest.skip("no VNNI: int8 linears run exact float32 GEMMs (float_sums), not a settled native call")
    import copy

    import quanta
    from quanta.integer.linear import Int8Linear
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24)).eval()
    data = [torch.randn(16, 40) for _ in range(2)]
    q = quanta.quantize(model, preset, calib_data=data if preset == "static_int8" else None, speed_check=False)
    lin = q[0]
    assert isinstance(lin, Int8Linear)
    x, big = torch.randn(3, 5, 40), torch.randn(70, 40)
    first = lin(x)
    assert len(lin.binding.calls) == 1
    guarded = copy.deepcopy(lin)
    assert guarded.binding.calls == {}
    for _ in range(2):
        assert torch.equal(lin(x), first)
        assert torch.equal(lin(big), guarded(big))  # another row bucket: its own settled call
    assert len(lin.binding.calls) == 2 and lin.kernel_counts[_MM] == 5
    assert torch.equal(guarded(x), first)
    if native.module().gemv_has_vnni():  # a few rows: the VNNI gemv is settled, same bits as the guarded path
        few = torch.randn(2, 40)
        for _ in range(2):
            assert torch.equal(lin(few), guarded(few))
        assert lin.kernel_counts["gemv_native"] == 2 and len(lin.binding.calls) == 3
    assert torch.equal(lin(x.transpose(0, 1).contiguous().transpose(0, 1)), first)  # non-contiguous input
    lin.pack()
    assert lin.binding.calls == {}
    if native.module().gemv_has_vnni():  # the GEMM asked for: packed for any row count, same bits
        forced = copy.deepcopy(guarded)
        forced.set_impl("gemm_native")
        few, before = torch.randn(2, 40), forced.kernel_counts["gemm_native"]
        assert torch.equal(forced(few), guarded(few)) and forced.kernel_counts["gemm_native"] == before + 1


@needs_native
def test_a_few_rows_settle_the_native_gemv_on_any_gemv_loop():
    """Where the build has the native gemv's loop (AVX-512 VNNI, or AVX2 without VNNI), a dynamic
    int8 Linear called with a few rows settles quantization + gemv + rescale in one native call:
    the guarded path's bits, and the reference kernels' bits."""
    from quanta.kernels.gemv_rows import gemv_isa
    if gemv_isa() == "none":
        pytest.skip("no native gemv loop in this build")
    import copy

    import quanta
    torch.manual_seed(2)
    q = quanta.quantize(torch.nn.Sequential(torch.nn.Linear(40, 24)).eval(), "dynamic_int8", speed_check=False)
    lin = q[0]
    guarded, ref = copy.deepcopy(lin), copy.deepcopy(lin)
    ref.set_impl("reference")
    few = torch.randn(2, 40)
    first = lin(few)
    for _ in range(2):
        assert torch.equal(lin(few), first)
    assert lin.kernel_counts == {"gemv_native": 3} and len(lin.binding.calls) == 1
    assert torch.equal(guarded(few), first) and torch.equal(ref(few), first)
