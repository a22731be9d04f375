"""Int8Add: residual additions in integer form, uint8 across the residual connection."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.core import QuantSpec
from quanta.integer.add import Int8Add
from quanta.kernels import native
from quanta.nn import Add, QuantAdd


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.add, self.relu2 = Add(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.add(self.conv2(self.relu1(self.conv1(x))), x))


class ResNetLike(nn.Module):
    """ResNet's data flow in small: each block's sum feeds the next block's conv and addition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.relu(self.stem(x))))


@pytest.fixture(scope="module")
def residual():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNetLike().eval()
    data = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), data, progress=False)
    q = quanta.convert(sim)
    return model, sim, q, torch.randn(2, 3, 12, 12, generator=g)


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()))


def test_prepare_turns_add_into_quant_add_on_the_presets_grid(residual):
    _, sim, _, _ = residual
    add = sim.blocks[0].add
    assert isinstance(add, QuantAdd)
    conv_in = sim.blocks[0].conv1.input_quantizer
    assert add.input_quantizer.spec == conv_in.spec and add.other_quantizer.spec == conv_in.spec


def test_residual_sums_stay_uint8_between_blocks(residual):
    """Structure: the convs before an addition and the additions themselves emit uint8 codes;
    the additions run the native kernel where it is loaded."""
    _, _, q, x = residual
    for block in q.blocks:
        assert isinstance(block.add, Int8Add)
        assert block.add.output_kind == "uint8" and block.add.post_op == "relu"
        assert block.conv2.output_kind == "uint8"
        assert block.add.operand_code_qparams(0) == block.conv2._emit
    assert q.stem.output_kind == "uint8"  # into block 0's conv1 and its addition (one grid)
    q(x)
    expected = "native" if native.ready() else "reference"
    assert all(set(b.add.kernel_counts) == {expected} for b in q.blocks)
    report = {r.name: r.result for r in quanta.conversion_report(q)}
    assert report["blocks.0.add"] == "Int8Add"


def test_integer_model_matches_the_simulation(residual):
    _, sim, q, x = residual
    with torch.no_grad():
        y_sim, y = sim(x), q(x)
    assert _sqnr(y_sim, y) > 30  # uint8 hand-offs round once in oneDNN instead of in the next quantizer
    assert float(torch.nn.functional.cosine_similarity(y_sim.flatten(), y.flatten(), dim=0)) > 0.999


def test_float_output_equals_the_simulation_exactly(residual):
    _, sim, _, _ = residual
    add = Int8Add.from_simulated(sim.blocks[1].add)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, 5, 5, generator=g), torch.rand(2, 16, 5, 5, generator=g) * 2
    with torch.no_grad():
        assert torch.equal(add(a, b), sim.blocks[1].add(a, b))
        add.set_output("float", post_op="relu")
        assert torch.equal(add(a, b), torch.relu(sim.blocks[1].add(a, b)))


def test_native_and_tensor_paths_agree(residual):
    """Codes of different memory orders take the tensor-operation path: same numbers."""
    _, sim, _, _ = residual
    add = Int8Add.from_simulated(sim.blocks[0].add)
    g = torch.Generator().manual_seed(4)
    # (the native uint8 path runs 16 codes at a time: sizes with and without a remainder, and
    # several threads, each thread's span with its own remainder)
    for shape, threads in (((2, 16, 6, 6), 1), ((1, 3, 7, 5), 1), ((3, 24, 29, 31), 2)):
        a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            for post in ("none", "relu", "relu6"):
                add.set_output("uint8", 0.02, 7, post_op=post)
                assert torch.equal(add(a, b), add(a.contiguous(memory_format=torch.channels_last), b)), (shape, post)
        finally:
            torch.set_num_threads(before)
    assert add.kernel_counts["reference"] >= 1 and (add.kernel_counts["native"] >= 1 or not native.ready())
    a = torch.randint(0, 256, (2, 16, 6, 6), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (2, 16, 6, 6), dtype=torch.uint8, generator=g)
    add.set_output("float")
    assert torch.equal(add(a, b), add(a.contiguous(memory_format=torch.channels_last), b))


def test_accepts_explains_and_bad_input_raises(residual):
    _, sim, _, _ = residual
    fresh = QuantAdd(quanta.QuantDescriptor(num_bits=8, unsigned=True))
    assert "no range" in Int8Add.accepts(fresh)
    assert "static per-tensor" in Int8Add.accepts(QuantAdd(quanta.QuantDescriptor(num_bits=8, dynamic=True)))
    assert "expects a QuantAdd" in Int8Add.accepts(nn.ReLU())
    add = Int8Add.from_simulated(sim.blocks[0].add)
    with pytest.raises(TypeError, match="uint8 codes"):
        add(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="expects tensors"):
        add([1.0], torch.zeros(2))
    with pytest.raises(ValueError, match="zero_point"):
        add.set_output("uint8", 0.1, 300)
    with pytest.raises(ValueError, match="static per-tensor"):
        Int8Add(input_spec=QuantSpec(granularity="per_token"))


def test_save_load_round_trip(residual, tmp_path):
    model, sim, q, x = residual
    for m, name in ((q, "int"), (sim, "sim")):
        path = tmp_path / f"{name}.quanta"
        quanta.save(m, path)
        for loaded in (quanta.load(path, trusted=[ResNetLike, Block]), quanta.load(path, model=model)):
            with torch.no_grad():
                assert torch.equal(loaded(x), m(x))
    loaded = quanta.load(tmp_path / "int.quanta", trusted=[ResNetLike, Block])
    assert isinstance(loaded.blocks[0].add, Int8Add) and loaded.blocks[0].add.output_kind == "uint8"


def test_deepcopy_keeps_the_numbers(residual):
    _, _, q, x = residual
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(q)(x), q(x))


def test_onnx_export_matches(residual, tmp_path):
    pytest.importorskip("onnxruntime")
    _, _, q, x = residual
    path = quanta.export_onnx(q, x, tmp_path / "r.onnx")
    report = quanta.compare_onnx(q, path, x)
    out = report.outputs[0]  # a float head without output quantizer: float rounding apart
    assert report.within(steps=1, identical=0.0) and out.max_abs_diff <= 1e-5, report
    adds = [r for r in report.layers if r.name.endswith("add")]
    assert len(adds) == 2 and all(r.frac_identical == 1.0 for r in adds), report


def test_compiles_to_one_graph_with_the_same_numbers(residual):
    _, _, q, x = residual
    import torch._dynamo as dynamo
    with torch.inference_mode():
        explained = dynamo.explain(q)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        dynamo.reset()
        assert torch.equal(torch.compile(q)(x), q(x))
