"""The recurrent gate equations live once (`quanta.core.recurrent_gates.gate_step`): they are
torch's, the simulation's step and the integer reference both run them, and no other module of
quanta writes them again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.core.recurrent_gates import MODES, check_mode, gate_step
from quanta.kernels import recurrent_math
from quanta.nn.modules.rnn_cells import make_step

CELLS = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell, "RNN_RELU": nn.RNNCell}


def _cell(mode: str) -> nn.Module:
    torch.manual_seed(MODES.index(mode))
    cls = CELLS[mode]
    return cls(5, 7, nonlinearity="relu") if mode == "RNN_RELU" else cls(5, 7)


@pytest.mark.parametrize("mode", MODES)
def test_gate_step_is_torchs_cell(mode):
    cell = _cell(mode)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    state = (h, c) if mode == "LSTM" else (h,)
    gi, gh = F.linear(x, cell.weight_ih, cell.bias_ih), F.linear(h, cell.weight_hh, cell.bias_hh)
    ours = gate_step(mode, gi, gh, state)
    with torch.no_grad():
        theirs = cell(x, state if mode == "LSTM" else h)
    for a, b in zip(ours, theirs if mode == "LSTM" else (theirs,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_simulation_step_and_integer_reference_run_the_same_equations(mode):
    assert recurrent_math._step is gate_step
    cell = _cell(mode)
    gi, h, c = torch.randn(4, CELLS[mode](1, 7).weight_hh.shape[0]), torch.randn(4, 7), torch.randn(4, 7)
    state = (h, c) if mode == "LSTM" else (h,)
    with torch.no_grad():
        stepped = make_step(mode, cell.weight_hh, cell.bias_hh)(gi, state)
        direct = gate_step(mode, gi, F.linear(h, cell.weight_hh, cell.bias_hh), state)
    assert all(torch.equal(a, b) for a, b in zip(stepped, direct))


def test_unknown_mode_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown recurrent mode 'LSTMX'; choose one of"):
        check_mode("LSTMX")
    with pytest.raises(ValueError, match="unknown recurrent mode"):
        make_step("LSTMX", torch.zeros(4, 1), None)


def test_no_other_recurrent_module_writes_the_gate_equations():
    root = Path(quanta.__file__).parent
    writers = set()
    for path in [*root.rglob("*rnn*.py"), *root.rglob("*recurrent*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "sigmoid":
                writers.add(str(path.relative_to(root)))
    assert writers == {"core/recurrent_gates.py"}
