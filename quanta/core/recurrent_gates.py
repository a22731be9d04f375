"""The recurrent gate equations (torch's LSTM / GRU / RNN cells), written once.

`gate_step` takes the two matmul results of a step, ``gi = x W_ih^T + b_ih`` and
``gh = h W_hh^T + b_hh``, and the state, and applies torch's equations in float. The simulation
(`quanta.nn.modules.rnn_cells.make_step`: fake-quantized matmul inputs) and the integer ops
(`quanta.kernels.recurrent_math`: integer matmuls) both call it, so both compute the same float
operations in the same order after their matmuls."""

from __future__ import annotations

import torch

#: RNNBase's mode names, and the gates each stacks in W_ih / W_hh (rows: gates x hidden units)
MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

State = tuple[torch.Tensor, ...]  # (h,) or (h, c)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown recurrent mode {mode!r}; choose one of {MODES}")
    return mode


def gate_step(mode: str, gi: torch.Tensor, gh: torch.Tensor, state: State) -> State:
    """The new state from ``gi``, ``gh`` and ``state`` (LSTM: ``(h, c)``, else ``(h,)``); GRU's
    ``h_n`` includes ``b_hn`` (it is part of ``gh``), and its blend ``(1 - z) n + z h`` uses the
    float ``h``. ``mode`` must be one of `MODES` (see `check_mode`)."""
    if mode == "LSTM":
        c = state[1]
        i, f, g, o = (gh + gi).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        h = state[0]
        h_r, h_z, h_n = gh.chunk(3, -1)
        i_r, i_z, i_n = gi.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return ((h - n) * z + n,)  # = (1 - z) n + z h
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return (act(gh + gi),)
