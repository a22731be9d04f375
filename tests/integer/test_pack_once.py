"""Pack once: one `quanta.quantize` lays each integer Linear out for its kernels once (not at
every construction, ``.to()``, ``set_post_op``, ``set_impl`` and convert step), and every change
that the packed form or a settled call depends on still rebuilds it: nothing stale is served.

The builds are counted by the work they do (`weight_sum` for `Int8Linear`, `int4pack_for_cpu`
for `Int4WeightOnlyLinear`), whatever the method that does it is called."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import linear as int8_linear_module
from quanta.integer import weight_only as weight_only_module
from quanta.integer.linear import Int8Linear
from quanta.integer.weight_only import Int4WeightOnlyLinear

torch.manual_seed(0)
D = 32


class TinyEncoder(nn.Module):
    """A transformer-shaped model: two encoder layers (MultiheadAttention in/out projections,
    feed-forward with GELU) and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, activation="gelu",
                                                               batch_first=True) for _ in range(2))
        self.head = nn.Linear(D, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The weights each packing step ran on, by module kind (ids: one entry per build)."""
    seen: dict[str, list[int]] = {"int8": [], "int4": []}
    weight_sum, int4pack = int8_linear_module.weight_sum, weight_only_module.int4pack_for_cpu

    def counted_sum(w: torch.Tensor) -> torch.Tensor:
        seen["int8"].append(id(w))
        return weight_sum(w)

    def counted_int4pack(*args, **kwargs):
        seen["int4"].append(id(args[0]))
        return int4pack(*args, **kwargs)

    monkeypatch.setattr(int8_linear_module, "weight_sum", counted_sum)
    monkeypatch.setattr(weight_only_module, "int4pack_for_cpu", counted_int4pack)
    return seen


def _data(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(4, 6, D) for _ in range(n)]


@pytest.mark.parametrize("preset", ["dynamic_int8", "static_int8", "weight_only_int4"])
def test_quantize_packs_each_linear_once(builds, preset):
    model = TinyEncoder().eval()
    data = _data()
    q = quanta.quantize(model, preset, calib_data=data, progress=False, speed_check=False,
                        group_size=32 if preset == "weight_only_int4" else None)
    kind, cls = ("int4", Int4WeightOnlyLinear) if preset == "weight_only_int4" else ("int8", Int8Linear)
    lowered = [m for m in q.modules() if isinstance(m, cls)]
    # int8: per layer the attention's in / out projections and the feed-forward pair, and the head;
    # weight-only int4: the feed-forward pairs and the head (the attention stays simulated)
    assert len(lowered) == (9 if kind == "int8" else 5)
    with torch.no_grad():
        first = q(data[0])
        assert torch.equal(q(data[0]), first)
    assert len(builds[kind]) == len(lowered), f"{len(builds[kind])} builds for {len(lowered)} modules"


def test_hf_bert_packs_each_linear_once(builds):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    q = quanta.quantize(model, "dynamic_int8", progress=False, speed_check=False)
    lowered = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(lowered) >= 12
    with torch.no_grad():
        q(input_ids=ids)
        q(input_ids=ids)
    assert len(builds["int8"]) == len(lowered)


# ----------------------------------------------------------------------------- triggers still repack
@pytest.fixture
def pair() -> tuple[Int8Linear, Int8Linear, torch.Tensor]:
    """Two converted Int8Linears of one shape with different weights, and an input."""
    data = [torch.randn(8, D) for _ in range(2)]
    a, b = (quanta.quantize(nn.Sequential(nn.Linear(D, 24)).eval(), "static_int8", calib_data=data,
                            progress=False, speed_check=False)[0] for _ in range(2))
    assert isinstance(a, Int8Linear) and not torch.equal(a.weight, b.weight)
    return a, b, torch.randn(5, D)


def _fresh(m: Int8Linear) -> Int8Linear:
    """The same module rebuilt from its configuration and state (packed from scratch)."""
    new = Int8Linear.from_config(m.config())
    new.load_state_dict(m.state_dict())
    return new


def test_load_state_dict_repacks(pair):
    a, b, x = pair
    a(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_in_place_weight_change_then_pack_repacks(pair, builds):
    a, b, x = pair
    before = a(x)
    with torch.no_grad():
        a.weight.mul_(-1)
    a.pack()
    assert len(builds["int8"]) == 1  # a built module is rebuilt at once
    assert torch.equal(a(x), _fresh(a)(x)) and not torch.equal(a(x), before)


def test_set_post_op_and_set_impl_are_served_fresh(pair):
    a, _, x = pair
    plain = a(x)
    a.set_post_op("relu")
    assert torch.equal(a(x), torch.relu(plain))
    a.set_post_op("none")
    assert torch.equal(a(x), plain)
    a.set_impl("reference")
    a.kernel_counts.clear()
    ref = a(x)
    assert dict(a.kernel_counts) == {"reference": 1} and torch.equal(ref, _fresh(a)(x))
    a.set_impl("auto")
    assert torch.equal(a(x), plain)


def test_device_move_rebuilds_at_once(pair, builds):
    a, _, x = pair
    y = a(x)
    a.to("cpu")
    assert len(builds["int8"]) == 1 and not a.binding.calls and not a.binding.choices
    assert torch.equal(a(x), y)
    if torch.cuda.is_available():
        assert torch.equal(a.cuda()(x.cuda()).cpu(), _fresh(a).cuda()(x.cuda()).cpu())


def test_deepcopy_packs_its_own_form(pair):
    a, b, x = pair
    y = a(x)
    twin = copy.deepcopy(a)
    assert twin.binding is not a.binding and not twin.binding.choices
    assert torch.equal(twin(x), y)
    twin.load_state_dict(b.state_dict())
    assert torch.equal(twin(x), b(x)) and torch.equal(a(x), y)


def test_int4_weight_change_then_pack_repacks(builds):
    torch.manual_seed(1)
    m = Int4WeightOnlyLinear(64, 32, group_size=32)
    m.weight.random_(0, 256)
    x = torch.randn(3, 64)
    y = m(x)  # (a module built by hand packs on its first call)
    assert len(builds["int4"]) == 1
    m.weight.random_(0, 256)
    m.pack()
    assert len(builds["int4"]) == 2
    fresh = Int4WeightOnlyLinear(64, 32, group_size=32)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(m(x), fresh(x)) and not torch.equal(m(x), y)


# ----------------------------------------------------------------------------- recurrent modules
class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.cell = nn.GRUCell(16, 16)
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(self.cell(out[:, -1]))


def test_quantize_packs_each_recurrent_module_once(monkeypatch):
    from quanta.integer.recurrent import _Recurrent

    builds: list[str] = []
    weights_of = _Recurrent._weights_of

    def counted(self, sfx):  # (once per layer and direction at every build)
        if sfx in ("", "_l0"):
            builds.append(type(self).__name__)
        return weights_of(self, sfx)

    monkeypatch.setattr(_Recurrent, "_weights_of", counted)
    q = quanta.quantize(_Tagger().eval(), "dynamic_int8", progress=False, speed_check=False)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(x), y)
    assert sorted(builds) == ["DynamicInt8GRUCell", "DynamicInt8LSTM"]


def test_recurrent_kernel_weights_follow_a_move():
    """``.to()`` replaces the buffers: the kernels' weight list is rebuilt from the new ones (it
    held the old tensors before)."""
    q = quanta.quantize(_Tagger().eval(), "dynamic_int8", progress=False, speed_check=False)
    x = torch.randn(3, 5, 8)
    y = q(x)
    q._apply(lambda t: t.clone())  # (what a device move does to the buffers, on any machine)
    lstm = q.rnn
    assert lstm._weights[0] is lstm.weight_ih_l0 and q.cell._weights[0] is q.cell.weight_ih
    assert torch.equal(q(x), y)
