"""Integer models under torch.compile: no graph breaks, fake kernels that state the real layout,
the fast kernels (not the reference) inside the compiled graph, and eager's numbers."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.integer.conv import Int8Conv2d
from quanta.kernels import conv_native
from quanta.kernels.conv import ONEDNN_SATURATION, int8_conv, kernel_strides
from quanta.kernels.linear import int8_linear


def _one_graph_run(model, x):
    """Asserts ``model`` compiles to one graph without breaks; ``(compiled output, names of the
    ops a second compiled call ran)``."""
    import torch._dynamo

    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model)
    got = compiled(x)
    with torch.profiler.profile() as prof:
        compiled(x)
    return got, [e.name for e in prof.events()]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("impl", ["onednn", "reference"])
@pytest.mark.parametrize("uint8_out", [False, True], ids=["float_out", "uint8_out"])
def test_int8_conv_fake_kernel_matches_every_implementation(dims, impl, uint8_out):
    if impl not in int8_conv.available_impls():
        pytest.skip(f"{impl} not available here")
    g = torch.Generator().manual_seed(dims)
    x = torch.randint(0, 256, (2, 8) + (6,) * dims, dtype=torch.uint8, generator=g)
    bound = 127 if ONEDNN_SATURATION.exact() else 64  # (without VNNI oneDNN sums 7-bit weights exactly)
    w = torch.randint(-bound, bound + 1, (4, 8) + (3,) * dims, dtype=torch.int8, generator=g)
    one = [1] * dims
    args = (x, 0.1, 3, w, torch.rand(4, generator=g), torch.rand(4, generator=g), one, one, one, 1, "relu",
            0.05 if uint8_out else None, 7 if uint8_out else 0, None, impl)
    result = torch.library.opcheck(torch.ops.quanta.int8_conv.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}
    y = torch.ops.quanta.int8_conv.default(*args)
    assert y.stride() == kernel_strides(y.shape)  # channels-last, whatever the implementation


@pytest.fixture(scope="module")
def cnn_int8(trained_cnn, digits_data):
    return quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False,
                           speed_check=False)


def test_converted_cnn_traces_without_graph_breaks(cnn_int8, digits_data):
    import torch._dynamo

    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(cnn_int8)(digits_data.x_test[:4])
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_converted_mlp_traces_without_graph_breaks():
    import torch._dynamo

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    q = quanta.quantize(mlp, "dynamic_int8", progress=False)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(q)(torch.randn(8, 64))
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_cnn_runs_the_onednn_kernels_with_eager_numbers(cnn_int8, digits_data):
    import torch._dynamo

    torch._dynamo.reset()
    x = digits_data.x_test[:16]
    compiled = torch.compile(cnn_int8)
    with torch.inference_mode():
        expected = cnn_int8(x)
        counts = {n: dict(m.kernel_counts) for n, m in cnn_int8.named_modules() if isinstance(m, IntegerModule)}
        got = compiled(x)
        with torch.profiler.profile() as prof:
            compiled(x)
    ops = {e.name for e in prof.events()}
    conv_impls = {impl for m in cnn_int8.modules() if isinstance(m, Int8Conv2d) for impl in m.kernel_counts}
    if "onednn" in int8_conv.available_impls() and ONEDNN_SATURATION.exact():  # (8-bit weights: full range)
        assert "onednn::qconv_pointwise" in ops  # the fast kernel, not the reference, inside the graph
        assert "aten::_slow_conv2d_forward" not in ops and "aten::convolution" not in ops
        assert "reference" not in conv_impls
    else:  # e.g. no VNNI (oneDNN's u8×s8 sums would saturate): eager and the graph run the exact reference
        assert "onednn::qconv_pointwise" not in ops
        assert conv_impls <= ({"native", "reference"} if "native" in int8_conv.available_impls() else {"reference"})
    # the same integer sums; oneDNN may order the float rescale differently for another layout
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    after = {n: dict(m.kernel_counts) for n, m in cnn_int8.named_modules() if isinstance(m, IntegerModule)}
    assert after == counts  # compiled calls do not mutate module state (that would recompile)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_graph_calls_the_settled_native_conv_with_eager_bits(cnn_int8, digits_data):
    """Convs whose eager calls settled on quanta's native conv run it in the compiled graph too,
    as the ``quanta_native::conv_packed`` op (straight to C++): one graph, eager's numbers (the
    convs' bit for bit; the traced linear head's float epilogue may round differently)."""

    import torch._dynamo

    from quanta.integer.conv import Int8Conv2d

    if not conv_native.conv_isa() == "avx512_vnni":  # (an AVX2 build's native loop takes 7-bit depthwise convs only)
        pytest.skip("native int8 conv (AVX-512 VNNI build) not available")
    model = copy.deepcopy(cnn_int8)
    x = digits_data.x_test[:8]
    torch._dynamo.reset()
    with torch.inference_mode():
        expected = model(x)  # eager: settles each conv's kernel for this input shape
        settled = [kind for m in model.modules() if isinstance(m, Int8Conv2d) for kind, _ in m.binding.compiled.values()]
        assert sorted(settled) == ["native", "native", "onednn"]  # (the 1-channel input conv stays on oneDNN)
        got, ops = _one_graph_run(model, x)
    assert ops.count("quanta_native::conv_packed") == 2
    # the conv settled on oneDNN: its op straight from the graph, not through int8_conv's dispatch
    assert "onednn::qconv_pointwise" in ops and "quanta::int8_conv" not in ops
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_int8_linear_traced_when_nothing_settled_keeps_the_numbers():
    """Compiled before any eager call (nothing settled), the linear kernels are traced into
    (inductor fuses their elementwise work): the activation codes stay exact, the float epilogue
    (and the fused GELU, torch's here, the native epilogue's eagerly) differ by float rounding only."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()
    q = quanta.quantize(mlp, "dynamic_int8", progress=False)
    assert q[0].post_op == "gelu"
    x = torch.randn(64, 256)
    fresh = copy.deepcopy(q)
    with torch.inference_mode():
        got = torch.compile(fresh)(x)
        assert not any(m.binding.compiled for m in fresh.modules() if isinstance(m, IntegerModule))
        expected = q(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_dynamic_int8_first_called_with_an_input_that_requires_grad():
    """The traced dynamic activation quantization worked in place on amax's output, which
    autograd saves for an input that requires grad: compiling failed (BackendCompilerFailed).
    Codes carry no gradient: the quantization reads the input detached."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    q = quanta.quantize(nn.Sequential(nn.Linear(32, 16)).eval(), "dynamic_int8", progress=False)
    fresh = copy.deepcopy(q)
    x = torch.randn(4, 32)
    got = torch.compile(fresh)(x.clone().requires_grad_())
    with torch.no_grad():
        expected = q(x)
    torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("preset,rows", [("dynamic_int8", 1), ("dynamic_int8", 64), ("static_int8", 64)])
def test_compiled_graph_calls_the_settled_native_linear_with_eager_bits(preset, rows):
    """Linears whose eager calls settled on the native kernels (VNNI gemv or GEMM, or torch._int_mm, with
    the fused GELU in the epilogue) run them in the compiled graph as one operator,
    ``quanta_native::linear_packed``: one graph, eager's bits, kernel counters untouched."""
    import torch._dynamo

    from quanta.kernels import native

    if not native.ready():
        pytest.skip("native kernels not available")
    from quanta.kernels.gemv_rows import gemv_max_rows
    few = rows <= min(gemv_max_rows(512, 256), gemv_max_rows(128, 512))  # the native gemv (VNNI or AVX2)
    if "float_sums" in int8_linear.available_impls() and not few:
        pytest.skip("no VNNI: int8 linears run exact float32 GEMMs (float_sums), not a settled native call")
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()
    calib = [torch.randn(16, 256) for _ in range(2)]
    q = quanta.quantize(mlp, preset, calib_data=calib if preset == "static_int8" else None, speed_check=False,
                        progress=False)
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        expected = q(x)
        assert all(m.binding.compiled for m in q.modules() if isinstance(m, IntegerModule))
        counts = {n: dict(m.kernel_counts) for n, m in q.named_modules() if isinstance(m, IntegerModule)}
        got, ops = _one_graph_run(q, x)
    assert ops.count("quanta_native::linear_packed") == 2
    # the kernel each layer settled on (linear_packed's `kernel`: 0 int_mm, 1 gemv, 2 the dense VNNI loop)
    vnni = native.module().gemv_has_vnni()
    kernels = {args[-2] for m in q.modules() if isinstance(m, IntegerModule) for args in m.binding.compiled.values()}
    assert kernels == ({1} if few else {2} if vnni else {0})
    assert torch.equal(got, expected)
    assert {n: dict(m.kernel_counts) for n, m in q.named_modules() if isinstance(m, IntegerModule)} == counts


def test_linear_packed_refuses_bad_arguments():
    from quanta.kernels import native
    from quanta.kernels.linear_native import compiled_linear_args

    if not native.ready():
        pytest.skip("native kernels not available")
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    args = compiled_linear_args("int_mm_native", w, torch.ones(8), None, None, 8, True, False, False, True,
                                "half_even")
    op = torch.ops.quanta_native.linear_packed.default
    x = torch.randn(4, 16)
    assert op(x, *args).shape == (4, 8)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        op(x, *args)
    with pytest.raises(RuntimeError, match="x must be row-major"):
        op(torch.randn(16, 4).t(), *args)
    with pytest.raises(RuntimeError, match="w must be contiguous int8"):
        op(torch.randn(4, 16), w.float(), *args[1:])
    assert compiled_linear_args("int_mm_native", w, torch.ones(8), None, None, 8, False, False, False, True,
                                "half_even") is None  # unsigned codes: the eager path only
    if native.module().gemv_has_vnni():  # the packed GEMM: same bits as the int_mm kernel
        from quanta.kernels.linear import gemm_pack
        x = torch.randn(13, 16)
        gemm = compiled_linear_args("gemm_native", w, torch.ones(8), None, None, 8, True, False, False, True,
                                    "half_even", packed=gemm_pack(w))
        assert torch.equal(op(x, *gemm), op(x, *args))
        with pytest.raises(RuntimeError, match="wpack must be"):
            op(x, w, *gemm[1:])
        with pytest.raises(ValueError, match="gemm_pack"):
            compiled_linear_args("gemm_native", w, torch.ones(8), None, None, 8, True, False, False, True, "half_even")


class _Stem(nn.Module):
    """A ResNet's opening in small: float RGB input, conv-ReLU, max-pool, one residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu, self.pool = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.conv1, self.relu1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
        self.add, self.relu2 = quanta.nn.Add(), nn.ReLU()
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.relu(self.stem(x)))
        return self.head(self.relu2(self.add(self.conv2(self.relu1(self.conv1(y))), y)))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_graph_runs_the_native_add_pool_and_input_quantization_with_eager_bits():
    """Between the convs, a compiled graph calls the native kernels eager runs, as operators
    (``add_codes``, ``max_pool2d_codes``, ``quantize_to_channels_last``), where inductor's own
    loops for the traced reference cost several times more (ResNet-18 at batch 16: 106 ms
    compiled vs 76 ms eager before): one graph, eager's bits."""
    import torch._dynamo

    from quanta.kernels import native

    if not native.ready():
        pytest.skip("native kernels not available")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Stem().eval()
    q = quanta.quantize(model, "static_int8", calib_data=[torch.randn(4, 3, 20, 20) for _ in range(2)],
                        speed_check=False, progress=False)
    assert q.add.output_kind == "uint8" and q.conv2.output_kind == "uint8"
    x = torch.randn(2, 3, 20, 20)
    with torch.inference_mode():
        expected = q(x)
        got, ops = _one_graph_run(q, x)
    for op in ("add_codes", "max_pool2d_codes", "quantize_to_channels_last"):
        assert ops.count(f"quanta_native::{op}") == 1, op
    assert torch.equal(got, expected)


@pytest.mark.parametrize("op,args", [
    ("add_codes", lambda a, b: (a, 0.1, 3, b, 0.2, 5, 1, 4.0, 2, 0, 255)),
    ("add_codes", lambda a, b: (a, 0.1, 3, b, 0.2, 5, 0, 0.0, 0, 0, 255)),
    ("max_pool2d_codes", lambda a, b: (a, [3, 3], [2, 2], [1, 1], [1, 1])),
    ("quantize_static", lambda a, b: (a.float(), 0.5, 3, 0, 255, False)),
    ("quantize_static", lambda a, b: (a.float(), 0.5, 0, -128, 127, True)),
    ("quantize_to_channels_last", lambda a, b: (a.float().contiguous(), 0.5, 3, 0, 255)),
])
def test_native_graph_operators_state_their_real_output(op, args):
    """Each operator's fake kernel (quanta.kernels.graph_ops) gives the real output's shape,
    dtype and strides (torch.library.opcheck runs both and compares)."""
    from quanta.kernels import native

    if not native.ready():
        pytest.skip("native kernels not available")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 8, 9, 7), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randint(0, 256, (2, 8, 9, 7), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    result = torch.library.opcheck(getattr(torch.ops.quanta_native, op).default, args(a, b),
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compiled_recurrent_layer_runs_the_native_time_loop_with_eager_bits(kind):
    """The native recurrent time loop needs nothing an eager call settles (`Impl.graph_safe`), so
    a compiled graph's opaque ``quanta::dynamic_int8_rnn`` runs it, not fbgemm's
    ``quantized_lstm`` (2.5x slower on the benchmark LSTM): eager's bits, no fbgemm op."""
    import torch._dynamo

    from quanta.kernels.recurrent import dynamic_int8_rnn

    if "native" not in dynamic_int8_rnn.available_impls():
        pytest.skip("native recurrent loop (AVX-512 VNNI build) not available")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = getattr(nn, kind)(16, 24, num_layers=2, batch_first=True).eval()
    q = quanta.quantize(model, "dynamic_int8", speed_check=False, progress=False)
    x = torch.randn(2, 7, 16)
    with torch.inference_mode():
        expected = q(x)  # eager: native, and found available
        compiled = torch.compile(q)
        got = compiled(x)
        with torch.profiler.profile() as prof:
            compiled(x)
    ops = [e.name for e in prof.events()]
    assert "quanta::dynamic_int8_rnn" in ops
    assert not any("quantized_lstm" in op or "quantized_gru" in op for op in ops)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        if isinstance(g, tuple):
            assert all(torch.equal(a, b) for a, b in zip(g, e))
        else:
            assert torch.equal(g, e)
