"""Shared fixtures: small real models trained once per test session on offline data.

Each ``*_data`` fixture returns a `Split` ``(x_train, y_train, x_test, y_test)``; each
``trained_*`` fixture returns a float model in eval mode. The models are shared by the whole
session: tests must not modify them (``quanta.prepare`` copies; otherwise ``copy.deepcopy``);
the session fails at teardown if one did.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from hypothesis import settings

from quanta import demo
from quanta.kernels import native

# Load (building once per machine) the native CPU kernels before any test chooses kernels, so
# that every test sees the same implementations whichever test happens to run first.
native.ensure()

# One intra-op thread for the whole session: the tests run tiny models and tensors, for which a
# second thread costs more than it gives. Measured on 2 shared cores: prepared-LSTM inference
# 0.04 s with 1 thread vs 2.4 s with 2; DigitsCNN training 0.8 s vs 11 s. Also deterministic.
torch.set_num_threads(1)

# The speed check caches its measured decisions per machine (quanta.transforms.speed_cache): a
# test run uses a fresh cache of its own, never the user's.
os.environ["QUANTA_SPEED_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="quanta-test-"), "speed_decisions.json")

# CI (which sets CI=true) replays the same hypothesis examples every run, so main cannot turn red
# on a rare draw; local runs keep drawing fresh examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class Split(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def calib_batches(self, n: int = 4, size: int = 64) -> list[torch.Tensor]:
        """``n`` training batches of ``size`` inputs (calibration data)."""
        return [self.x_train[i * size:(i + 1) * size] for i in range(n)]


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int) -> Split:
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """``with torch_threads(n):`` runs torch on ``n`` threads and restores the count after."""
    return _threads


RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _rnn_layer_case(mode: str, batch: int, hidden: int, seed: int, steps: int = 9):
    gen = torch.Generator().manual_seed(seed)
    n = RNN_GATES[mode] * hidden
    w = torch.randint(-128, 128, (n, hidden), dtype=torch.int8, generator=gen)
    w[0, : hidden // 2] = -128  # the extremes: -128 / 127 against codes of -128 / 127 (or 0 / 255)
    w[n - 1] = 127
    s = torch.rand(n, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen)
    gi = torch.randn(steps, batch, n, generator=gen) * 2
    state = [torch.randn(batch, hidden, generator=gen) for _ in range(2 if mode == "LSTM" else 1)]
    return gi, state, w, s, b


@pytest.fixture
def rnn_layer_case():
    """``gi, state, w_hh, s_hh, b_hh = rnn_layer_case(mode, batch, hidden, seed, steps=9)``: one
    recurrent layer's inputs for the native time loop (``mode`` LSTM / GRU / RNN_TANH / RNN_RELU;
    int8 weights with rows at the extremes), the same for the same arguments."""
    return _rnn_layer_case


@pytest.fixture
def seven_bit_fast_and_reference():
    """``fast, ref = seven_bit_fast_and_reference(model, images)``: ``model`` prepared with
    ``static_int8(weight_bits=7)``, calibrated on ``images``, and converted twice without the
    speed check: on this machine's fast kernels and on the reference backend."""
    import quanta

    def make(model: torch.nn.Module, images: list[torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module]:
        sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8", weight_bits=7)), images,
                               progress=False)
        return quanta.convert(sim, speed_check=False), quanta.convert(sim, backend="reference", speed_check=False)

    return make


def _train(model: torch.nn.Module, data: Split, **kwargs) -> torch.nn.Module:
    # Always one thread, whatever a test set meanwhile: the trained weights (and so every
    # accuracy threshold) do not depend on the thread count or on the test order.
    with _threads(1):
        torch.manual_seed(0)
        return demo.train_classifier(model, data.x_train, data.y_train, seed=0, **kwargs).eval()


def _guarded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Yield the shared model; at the end of the session, fail if a test changed it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    yield model
    now = model.state_dict()
    changed = sorted(set(now) ^ set(state)) + [k for k in state if k in now and not torch.equal(now[k], state[k])]
    assert not changed, f"a test modified the shared trained {type(model).__name__}: {changed[:5]}"
    assert [type(m) for m in model.modules()] == types, f"a test swapped modules of {type(model).__name__}"
    assert not model.training, f"a test left the shared {type(model).__name__} in train mode"


@pytest.fixture(scope="session")
def digits_data() -> Split:
    """scikit-learn's 8×8 digits, ``x``: ``[n, 1, 8, 8]`` in [0, 1]; 1347 train / 449 test."""
    return Split(*demo.digits(seed=0))


@pytest.fixture(scope="session")
def trained_cnn(digits_data: Split) -> Iterator[torch.nn.Module]:
    """`DigitsCNN` trained 8 epochs (about 98% test accuracy)."""
    torch.manual_seed(0)
    yield from _guarded(_train(demo.DigitsCNN(), digits_data, epochs=8))


@pytest.fixture(scope="session")
def sequence_data() -> Split:
    """Noisy sinusoids, class = frequency; ``x``: ``[n, 24, 1]``; 1500 train / 500 test."""
    x, y = demo.sine_sequences(n=2000, length=24, seed=0)
    return _split(x, y, 1500)


@pytest.fixture(scope="session")
def trained_lstm(sequence_data: Split) -> Iterator[torch.nn.Module]:
    """`SequenceLSTM` (2 layers, hidden 32) trained 6 epochs (about 97%)."""
    torch.manual_seed(0)
    yield from _guarded(_train(demo.SequenceLSTM(), sequence_data, epochs=6))


@pytest.fixture(scope="session")
def token_data() -> Split:
    """Generated token sequences (majority marker), ``x``: ``[n, 16]`` long; 1500 train / 500 test."""
    x, y = demo.majority_tokens(n=2000, length=16, seed=0)
    return _split(x, y, 1500)


@pytest.fixture(scope="session")
def trained_transformer(token_data: Split) -> Iterator[torch.nn.Module]:
    """`TinyTransformer` (embedding, one encoder layer, head) trained 6 epochs (about 94-95%)."""
    torch.manual_seed(0)
    yield from _guarded(_train(demo.TinyTransformer(), token_data, epochs=6, lr=3e-3))
