"""A trained DigitsCNN with one fragile layer (`fragile.FRAGILE`), and its simulated / integer
int8 versions.

``features.3`` is made fragile without changing what the float model computes: BatchNorm
``features.1`` scales output channel 3 down by 100 (ReLU commutes with a positive scale) and
conv ``features.3`` scales its weights reading that channel up by 100. In int8 the channel's
activations fall below one step of ``features.3``'s input grid, and that layer's per-output-
channel weight ranges are set by the 100× column, so its other weights round to few levels.
"""

from __future__ import annotations

import copy

import pytest
import torch

import quanta


@pytest.fixture(scope="module")
def fragile_cnn(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        bn = model.features[1]
        bn.weight[3] /= 100.0
        bn.bias[3] /= 100.0
        model.features[3].weight[:, 3] *= 100.0
    return model


@pytest.fixture(scope="module")
def fragile_sim(fragile_cnn, digits_data):
    sim = quanta.prepare(fragile_cnn, quanta.preset("static_int8"))
    quanta.calibrate(sim, digits_data.calib_batches(), progress=False)
    return sim


@pytest.fixture(scope="module")
def fragile_int(fragile_sim):
    return quanta.convert(fragile_sim, speed_check=False)
