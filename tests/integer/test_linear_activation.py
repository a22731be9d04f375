"""An activation fused into an integer Linear (``Int8Linear.post_op``, set by `fuse_activations`):
which patterns fuse, the numbers (torch's activation on the reference path, the native epilogue's
on the fast paths, first and settled calls alike), save / load, and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.linear import Int8Linear
from quanta.kernels import native


class _Functional(nn.Module):
    """A GELU called as a function (cannot be taken out of forward: not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc(x)))


class _Shared(nn.Module):
    """One GELU module called twice, and a Linear output read twice: neither fuses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.head(self.act(h) + h + self.act(self.b(x)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(approximate="tanh"),
                         nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()


def test_activation_modules_after_integer_linears_fuse():
    float_model = _mlp()
    q = quanta.quantize(float_model, "dynamic_int8", speed_check=False)
    assert [q[i].post_op for i in (0, 2, 4, 6)] == ["gelu", "gelu_tanh", "relu", "none"]
    assert all(isinstance(q[i], nn.Identity) for i in (1, 3, 5))
    assert "post_op=gelu" in repr(q[0])
    x = torch.randn(20, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), float_model(x), atol=0.05, rtol=0.05)


def test_functional_shared_and_multi_reader_activations_stay():
    q = quanta.quantize(_Functional().eval(), "dynamic_int8", speed_check=False)
    assert q.fc.post_op == "none"
    q = quanta.quantize(_Shared().eval(), "dynamic_int8", speed_check=False)
    assert q.a.post_op == q.b.post_op == "none" and isinstance(q.act, nn.GELU)


@pytest.mark.parametrize("rows", [1, 9])  # the native gemv / the VNNI GEMM (or torch._int_mm + the native epilogue)
def test_fused_numbers_first_and_settled_calls_and_reference(rows):
    q = quanta.quantize(_mlp(), "dynamic_int8", speed_check=False)
    x = torch.randn(rows, 32)
    with torch.no_grad():
        first, settled = q(x), q(x)
        assert torch.equal(first, settled)
        kernels = {k for m in q.modules() if isinstance(m, Int8Linear) for k in m.kernel_counts}
        if native.ready():
            assert kernels <= {"gemv_native", "gemm_native", "int_mm_native", "float_sums"}
        # the reference: torch's activation after the reference int8 linear, exactly
        lin = q[0]
        unfused = Int8Linear.from_config({**lin.config(), "post_op": "none"})
        unfused.load_state_dict(lin.state_dict())
        unfused.set_impl("reference")
        lin_ref = Int8Linear.from_config(lin.config())
        lin_ref.load_state_dict(lin.state_dict())
        lin_ref.set_impl("reference")
        assert torch.equal(lin_ref(x), F.gelu(unfused(x)))
        # the fast path: the native GELU, within its bound of torch's
        y = lin(x)
        torch.testing.assert_close(y, F.gelu(unfused(x)), rtol=0, atol=2e-6 * max(1.0, float(y.abs().max())))


def test_post_op_survives_save_and_load(tmp_path):
    q = quanta.quantize(_mlp(), "dynamic_int8", speed_check=False)
    quanta.save(q, tmp_path / "m.quanta")
    back = quanta.load(tmp_path / "m.quanta")
    assert [back[i].post_op for i in (0, 2, 4)] == ["gelu", "gelu_tanh", "relu"]
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_speed_check_swaps_in_the_float_twin_with_its_activation(monkeypatch):
    """A fused Linear that the speed check replaces by its float twin brings the user's activation
    module back in its place (the model's own architecture again)."""
    from quanta.transforms import speed_check

    def slow_integer(kind, fn):
        fn()
        return 1.0 if kind == "integer" else 1e-3

    monkeypatch.setattr(speed_check, "_perf_counter", slow_integer)
    float_model = _mlp()
    q = quanta.quantize(float_model, "dynamic_int8", example=torch.randn(4, 32))
    assert [type(m) for m in q] == [type(m) for m in float_model]
    assert q[1] is not float_model[1] and q[3].approximate == "tanh" and type(q[5]) is nn.ReLU
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), float_model(x))


def test_bad_post_ops_are_refused():
    with pytest.raises(ValueError, match="post_op must be one of"):
        Int8Linear(8, 4, post_op="swish")
    with pytest.raises(ValueError, match="cannot fuse 'gelu' after an output quantizer"):
        Int8Linear(8, 4, output_spec=quanta.QuantSpec(), post_op="gelu")
