"""Tier 3: a compiled integer model runs the kernels its eager calls settled (not a traced
re-expression of them), in one graph, with eager's bits; the graph calls of settled eager
callables (`quanta.kernels.graph_ops.settled_call`) live as long as their binding.

One compile per model (a module fixture), tiny models: each compile takes seconds."""

from __future__ import annotations

import copy
import gc
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.integer.conv import Int8Conv2d
from quanta.integer.linear import Int8Linear
from quanta.integer.padded_conv import Int8PaddedConv2d
from quanta.kernels import graph_ops, native

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="inductor needs a C++ compiler"),
    pytest.mark.skipif(not native.ready(), reason="native kernels not available"),
]

#: the graph operators by which a compiled graph runs what eager settled, per implementation
_GRAPH_OPS = {"onednn": ("quanta_graph::settled_call", "onednn::qconv_pointwise"),
              "avx2_gemm": ("quanta_graph::settled_call",),
              "native": ("quanta_native::conv_packed",),
              "gemv_native": ("quanta_native::linear_packed", "quanta_graph::settled_call"),
              "gemm_native": ("quanta_native::linear_packed",), "int_mm_native": ("quanta_native::linear_packed",)}


def _settled_impls(model: nn.Module) -> Counter[str]:
    return Counter(impl for m in model.modules() if isinstance(m, (Int8Linear, Int8Conv2d))
                   for impl, _ in m.binding.calls.values())


def _compiled_run(model: nn.Module, x: torch.Tensor):
    """``(eager output, compiled output, op names of one compiled call, graph breaks, kernel counts
    before and after the compiled calls)``; eager runs first (it settles the kernels)."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch.inference_mode():
        expected = model(x)
        explained = torch._dynamo.explain(model)(x)
        counts = {n: dict(m.kernel_counts) for n, m in model.named_modules() if isinstance(m, IntegerModule)}
        compiled = torch.compile(model)
        got = compiled(x)
        with torch.profiler.profile() as prof:
            compiled(x)
        after = {n: dict(m.kernel_counts) for n, m in model.named_modules() if isinstance(m, IntegerModule)}
    return expected, got, Counter(e.name for e in prof.events()), explained.graph_break_count, counts, after


# --------------------------------------------------------------------- transformer feed-forward
class _FeedForward(nn.Module):
    """A transformer feed-forward block with its residual, as sentence encoders write it (the
    LayerNorm after it left out: inductor's float reductions round differently from eager's)."""

    def __init__(self, hidden: int = 64, ffn: int = 128) -> None:
        super().__init__()
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.output(F.gelu(self.intermediate(x)))


@pytest.fixture(scope="module")
def feed_forward_run():
    torch.manual_seed(0)
    calib = [torch.randn(2, 16, 64) for _ in range(2)]
    q = quanta.quantize(_FeedForward().eval(), quanta.preset("static_int8", weight_bits=7), calib_data=calib,
                        speed_check=False, progress=False)
    return q, _compiled_run(q, torch.randn(2, 16, 64))


def test_compiled_feed_forward_runs_the_linear_kernels_eager_settled(feed_forward_run):
    """Each Int8Linear runs, in the graph, what its eager calls settled: with 7-bit weights on a
    CPU without VNNI that is oneDNN's int8 GEMM (its eager call whole, ``settled_call``), not
    float32 GEMMs on the codes that tracing the guarded path gave (the sentence encoder's
    compiled FFN was 1.5x slower than eager). With VNNI: the native ``linear_packed``."""
    q, (_, _, ops, breaks, counts, after) = feed_forward_run
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 and breaks == 0
    settled = _settled_impls(q)
    assert sum(settled.values()) == 2, settled
    graph_calls = sum(ops[name] for name in {n for impl in settled for n in _GRAPH_OPS[impl]})
    assert graph_calls == 2, (settled, ops)
    if "onednn" in settled:
        assert ops["quanta_graph::settled_call"] == settled["onednn"] and ops["onednn::qlinear_pointwise"] == 2
        assert not ops["mkl::_mkl_linear"] and not ops["aten::mm"] and not ops["aten::addmm"]
    if "avx2_gemm" in settled:  # (7-bit weights, AVX2 without VNNI: quanta's exact AVX2 GEMM, its eager call whole)
        assert ops["quanta_graph::settled_call"] == settled["avx2_gemm"]
        assert not ops["mkl::_mkl_linear"] and not ops["aten::mm"] and not ops["aten::addmm"]
    assert after == counts  # a compiled call mutates no module state (that would recompile)


def test_compiled_feed_forward_gives_eager_bits(feed_forward_run):
    _, (expected, got, *_rest) = feed_forward_run
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------- TF-ported block
class _SamePadConv(nn.Conv2d):
    """A TF port's conv: static 'same' padding (asymmetric at stride 2) with F.pad, then F.conv2d."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        total = max(kernel - stride, 0)
        self.same = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class _InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            _SamePadConv(h, h, 3, groups=h), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _TFMobileBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(_SamePadConv(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU6())
        self.body = nn.Sequential(_InvertedResidual(16), _InvertedResidual(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def tf_block_run():
    torch.manual_seed(0)
    model = _TFMobileBlock().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    calib = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    q = quanta.quantize(copy.deepcopy(model), quanta.preset("static_int8", weight_bits=7), calib_data=calib,
                        speed_check=False, progress=False)
    return q, _compiled_run(q, torch.randn(1, 3, 32, 32))


def test_compiled_tf_block_runs_the_conv_kernels_eager_settled(tf_block_run):
    """No graph break; each conv eager settled runs its kernel straight from the graph (the
    native loop as ``conv_packed``, oneDNN as ``qconv_pointwise``), never through int8_conv."""
    q, (_, _, ops, breaks, counts, after) = tf_block_run
    assert breaks == 0
    convs = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == 7
    settled = Counter(impl for m in convs for impl, _ in m.binding.calls.values())
    assert sum(settled.values()) == 7, settled
    assert ops["quanta_native::conv_packed"] == settled["native"]
    assert ops["onednn::qconv_pointwise"] == settled["onednn"]
    assert not ops["quanta::int8_conv"] and not ops["quanta::quantize_codes"]
    assert after == counts


def test_compiled_tf_block_pads_codes_with_aten_as_eager_does(tf_block_run):
    """The asymmetric 'same' pad of an Int8PaddedConv2d's codes runs aten's pad from the graph (as
    ``settled_call``): inductor's own loop for channels-last uint8 codes measured ~10x slower
    (0.57 ms vs 0.05 ms on [1, 96, 112, 112], 2 AVX2 cores), the TF MobileNet's five such pads
    made its compiled run slower than eager."""
    q, (_, _, ops, *_rest) = tf_block_run
    padded = [m for m in q.modules() if isinstance(m, Int8PaddedConv2d)]
    assert len(padded) == 1  # (the stride-2 stem: its 'same' pad is asymmetric; the others fold into the kernel)
    assert ops["aten::constant_pad_nd"] == 1 and ops["quanta_graph::settled_call"] >= 1


def test_compiled_tf_block_gives_eager_bits(tf_block_run):
    _, (expected, got, *_rest) = tf_block_run
    assert torch.equal(got, expected)


def _guard_parts(model: nn.Module) -> list[str]:
    """The code of every guard torch.compile checks before each call of ``model``'s graphs."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    parts: list[str] = []

    def walk(manager) -> None:
        for leaf in manager.get_leaf_guards():
            parts.extend(leaf.verbose_code_parts())
        children = list(manager.get_child_managers())
        if hasattr(manager, "get_key_value_managers"):  # (a dict's entries, e.g. a Sequential's modules)
            children += [m for pair in manager.get_key_value_managers().values() for m in pair if m is not None]
        for child in children:
            walk(child)
    for entry in _debug_get_cache_entry_list(type(model).forward.__code__):
        walk(entry.guard_manager.root)
    return parts


def test_compiled_tf_block_guards_each_conv_constants_once(tf_block_run):
    """Guards run on every compiled call: a settled conv's kernel constants (the native loop's
    13 ints, 2 floats and kind; oneDNN's scales, strides...) are guarded through their holder
    (`graph_ops.GraphConstants`: its identity and token), not one guard per value (~25 guards
    per conv before, ~2400 in all on the TF MobileNet)."""
    q, _ = tf_block_run  # (its compiled graph's guards are still cached: nothing reset them since)
    convs = {n for n, m in q.named_modules() if isinstance(m, Int8Conv2d)}
    parts = [p.split("#")[0] for p in _guard_parts(q) if ".binding.compiled[(torch.uint8" in p
             and any(f"['{n.split('.')[-1]}'].binding" in p for n in convs)]
    assert parts, "no guard reads the settled entries: the compiled graph was not found"
    per_value = [p for p in parts if " == " in p and ".token ==" not in p and not p.startswith(("len(", "hasattr("))]
    assert not per_value, per_value[:3]
    assert sum(".token ==" in p for p in parts) == len(convs)


# ------------------------------------------------------------------ settled calls' lifetime
def _seven_bit_linear() -> nn.Module:
    torch.manual_seed(1)
    calib = [torch.randn(4, 24) for _ in range(2)]
    return quanta.quantize(nn.Sequential(nn.Linear(24, 40)).eval(), quanta.preset("static_int8", weight_bits=7),
                           calib_data=calib, speed_check=False, progress=False)


def test_settled_graph_calls_are_released_with_their_binding():
    """The graph-call table holds a settled call (and its weights) only while the binding that
    settled it lives: repacking or deleting the module frees it."""
    q = _seven_bit_linear()
    with torch.inference_mode():
        q(torch.randn(3, 24))
    handles = [h.handle for m in q.modules() if isinstance(m, Int8Linear) for h in m.binding.compiled.values()
               if isinstance(h, graph_ops.SettledGraphCall)]
    if not handles:
        pytest.skip("this CPU settles the Linear on a native graph operator (no settled_call)")
    assert all(h in graph_ops._SETTLED for h in handles)
    q[0].pack()  # a new binding: the old one's graph calls go
    gc.collect()
    assert not any(h in graph_ops._SETTLED for h in handles)
    with torch.inference_mode():
        q(torch.randn(3, 24))
    newer = [h.handle for h in q[0].binding.compiled.values()]
    assert newer and not set(newer) & set(handles)  # handles are never reused
    del q
    gc.collect()
    assert not any(h in graph_ops._SETTLED for h in newer)


def test_compiled_graph_follows_new_weights_instead_of_a_released_call():
    """A graph compiled against one binding's settled call recompiles after the weights change
    (its guard on the call's handle fails) and gives the new eager numbers."""
    import torch._dynamo

    q = _seven_bit_linear()
    x = torch.randn(3, 24)
    torch._dynamo.reset()
    compiled = torch.compile(q)
    with torch.inference_mode():
        q(x)
        compiled(x)
        with torch.no_grad():
            q[0].weight.copy_(-q[0].weight)
        q[0].pack()
        gc.collect()
        expected = q(x)
        assert torch.equal(compiled(x), expected)


def test_register_settled_call_refuses_non_callables():
    with pytest.raises(TypeError, match="callables"):
        graph_ops.register_settled_call(None, lambda x: x)


class _StrideTwoDepthwise(nn.Module):
    """A TF port's stride-2 'same' depthwise conv inside a uint8 chain: eager and graphs pad its codes
    inside the native kernel (padded_depthwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                                  _SamePadConv(16, 16, 3, stride=2, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                                  nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (no float op after the last conv: inductor's own reductions round otherwise)


def test_compiled_stride_two_depthwise_after_eager_has_no_graph_break():
    """Compiled after eager calls (which settle the in-kernel padding): no graph break (dynamo cannot
    trace the native plan's pybind call: the graph calls the conv_packed op with the plan's 4 padding
    values instead, no aten pad) and eager's bits."""
    torch.manual_seed(0)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    q = quanta.quantize(_StrideTwoDepthwise().eval(), quanta.preset("static_int8", weight_bits=7), calib_data=calib,
                        speed_check=False, progress=False)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        q(x)  # (the padded input's first call settles; the in-kernel padding is filed after it)
    padded = [m for m in q.modules() if isinstance(m, Int8PaddedConv2d)]
    assert len(padded) == 1 and padded[0].groups == 16
    if not any(key[0] == "unpadded" for key in padded[0].binding.calls):
        pytest.skip("the depthwise conv did not settle on the native kernel here")
    expected, got, ops, breaks, *_rest = _compiled_run(q, x)
    assert breaks == 0
    assert torch.equal(got, expected)
    # the graph pads inside the kernel too: the depthwise conv's conv_packed op with 4 padding values,
    # no copy of the codes by aten's pad
    assert ops["quanta_native::conv_packed"] >= 2 and not ops["aten::constant_pad_nd"], ops
