"""`quanta.kernels.binding.Binding`: the guards choose once per key, a preferred implementation
skips them, settled calls stay bounded, counts land in the module's ``kernel_counts`` (also
after a copy, a pickle or ``kernel_counts.clear()``), and ``pack()`` forgets what was settled."""

from __future__ import annotations

import copy
import io
from collections import Counter

import pytest
import torch

from quanta.integer.weight_only import Int8WeightOnlyLinear
from quanta.kernels.binding import Binding
from quanta.kernels.weight_only import int8_weight_only_linear


def _args(rows: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(rows)
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    return torch.randn(rows, 40), w, torch.rand(24) + 0.01, torch.randn(24)


@pytest.fixture
def choose_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    choose = int8_weight_only_linear.choose

    def counted(*args):
        calls.append(args[0].shape[0])
        return choose(*args)

    monkeypatch.setattr(int8_weight_only_linear, "choose", counted)
    return calls


def test_guards_choose_once_per_key(choose_calls):
    b = Binding()
    small, big = _args(1), _args(40)
    first = b.choose(int8_weight_only_linear, "one row", *small)
    assert first[1] is True and first[0] in int8_weight_only_linear.available_impls()
    assert b.choose(int8_weight_only_linear, "one row", *small) == first
    b.choose(int8_weight_only_linear, "many rows", *big)
    assert choose_calls == [1, 40] and len(b.choices) == 2


def test_a_preferred_implementation_skips_the_guards(choose_calls):
    b = Binding()
    assert b.choose(int8_weight_only_linear, "k", *_args(3), preferred="reference") == ("reference", False)
    assert choose_calls == [] and b.choices == {}


def test_run_counts_and_matches_the_op():
    counts: Counter[str] = Counter()
    b = Binding(counts)
    args = _args(5)
    y = b.run(int8_weight_only_linear, "k", *args)
    impl = next(iter(counts))
    assert counts == {impl: 1}
    assert torch.equal(y, int8_weight_only_linear(*args, impl=impl))
    assert torch.equal(b.run(int8_weight_only_linear, "k", *args, preferred="reference"),
                       int8_weight_only_linear(*args, impl="reference"))
    assert counts["reference"] == 1


def test_settled_calls_are_bounded():
    b = Binding(limit=2)
    kept = [b.settle(("sig", i), "k", lambda x: x, compiled=(i,)) for i in range(3)]
    assert kept == [True, True, False] and len(b.calls) == 2 and b.compiled == {("sig", 0): (0,), ("sig", 1): (1,)}
    assert "calls=['k', 'k']" in repr(b)


@pytest.mark.parametrize("limit", [0, -1, True, 2.0, "8"])
def test_bad_limits_are_refused(limit):
    with pytest.raises(ValueError, match="limit must be a positive int"):
        Binding(limit=limit)


def _module() -> Int8WeightOnlyLinear:
    torch.manual_seed(0)
    m = Int8WeightOnlyLinear(40, 24)
    m.load_state_dict({"weight": torch.randint(-127, 128, (24, 40), dtype=torch.int8),
                       "weight_scale": torch.rand(24) + 0.01, "bias": torch.randn(24)})
    return m


def test_module_counts_survive_clear_and_pack_forgets_choices():
    m = _module()
    x = torch.randn(3, 40)
    m(x)
    assert len(m.binding.choices) == 1 and m.binding.counts is m.kernel_counts
    m.kernel_counts.clear()  # (the speed check does this): counting goes on
    m(x)
    assert sum(m.kernel_counts.values()) == 1
    m.set_impl("reference")
    assert not m.binding.choices and m.binding.counts is m.kernel_counts
    m(x)
    assert m.kernel_counts["reference"] == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_counts_into_its_own_kernel_counts(how):
    m = _module()
    x = torch.randn(3, 40)
    y = m(x)
    if how == "deepcopy":
        twin = copy.deepcopy(m)
    else:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    before = dict(m.kernel_counts)
    assert torch.equal(twin(x), y)
    assert dict(m.kernel_counts) == before and twin.binding.counts is twin.kernel_counts
    assert sum(twin.kernel_counts.values()) == sum(before.values()) + 1


@pytest.fixture
def settles_int_mm_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``impl="auto"`` choose ``int_mm_native`` wherever its guard accepts (on CPUs without
    VNNI the guards prefer the exact float GEMM, and nothing would be settled there)."""
    from quanta.kernels.linear import int8_linear
    from quanta.kernels.linear_native import NATIVE_LINEAR_IMPLS

    native_mm = next(i for i in int8_linear.impls if i.name == "int_mm_native")
    if not native_mm.is_available():
        pytest.skip("the native library is not loaded")
    assert native_mm.name in NATIVE_LINEAR_IMPLS
    choose = int8_linear.choose
    monkeypatch.setattr(int8_linear, "choose",
                        lambda *args: "int_mm_native" if native_mm.guard(*args) is None else choose(*args))


@pytest.mark.parametrize("preset", ["dynamic_int8", "static_int8"])
def test_settled_native_linear_is_forgotten_by_every_change(settles_int_mm_native, preset):
    import quanta
    from quanta.integer.linear import Int8Linear

    torch.manual_seed(0)
    data = [torch.randn(16, 40) for _ in range(2)]
    a, b = (quanta.quantize(torch.nn.Sequential(torch.nn.Linear(40, 24)).eval(), preset, calib_data=data,
                            progress=False, speed_check=False)[0] for _ in range(2))
    assert isinstance(a, Int8Linear)
    x = torch.randn(3, 5, 40)
    first = a(x)
    assert [impl for impl, _ in a.binding.calls.values()] == ["int_mm_native"] and len(a.binding.compiled) == 1
    for _ in range(2):
        assert torch.equal(a(x), first)  # the settled call: the guarded call's bits
    assert a.kernel_counts == {"int_mm_native": 3}
    a.set_post_op("relu")
    assert not a.binding.calls
    assert torch.equal(a(x), torch.relu(first)) and torch.equal(a(x), torch.relu(first))  # guarded, then settled
    a.set_post_op("none")
    assert torch.equal(a(x), first)
    a.load_state_dict(b.state_dict())
    assert not a.binding.calls and torch.equal(a(x), b(x)) and torch.equal(a(x), b(x))


def test_a_module_pickled_without_the_packing_state_still_runs():
    """A pickle from before deferred packing (no ``_stale``, old runtime attributes) loads, packs
    when first called and gives the same numbers."""
    from quanta.integer.linear import Int8Linear

    torch.manual_seed(0)
    m = Int8Linear(40, 24)
    m.weight.random_(-127, 128)
    x = torch.randn(3, 40)
    y = m(x)
    state = m.__getstate__()
    del state["_stale"]
    state["_calls"] = {}
    old = Int8Linear.__new__(Int8Linear)
    old.__setstate__(state)
    assert torch.equal(old(x), y)
