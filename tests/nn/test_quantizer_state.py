"""`TensorQuantizer.quantizing` / `.active`: the one public spelling of "is this quantizer on",
true to what its forward does; the private mode flags are read only where they are saved and
restored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import quanta
from quanta.nn import QuantDescriptor, TensorQuantizer

PACKAGE = Path(quanta.__file__).parent
#: the class itself, and the two places that save / restore the raw flags (the saved file, calibration)
FLAG_OWNERS = {"nn/tensor_quantizer.py", "io/record_kinds.py", "transforms/calibrate.py"}


@pytest.mark.parametrize("disabled", [False, True], ids=["enabled", "disabled"])
@pytest.mark.parametrize("quant", [False, True], ids=["noquant", "quant"])
@pytest.mark.parametrize("calib", [False, True], ids=["nocalib", "calib"])
def test_properties_say_what_forward_does(disabled, quant, calib):
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    q.disable() if disabled else q.enable()
    q.enable_quant() if quant else q.disable_quant()
    q.enable_calib() if calib else q.disable_calib()
    x = torch.linspace(-2, 2, 101)
    y = q(x)
    assert q.quantizing == (not disabled and quant) == (not torch.equal(y, x))
    assert q.active == (not disabled and (quant or calib))
    collected = q.calibrator is not None and q.calibrator.num_batches > 0
    assert collected == (not disabled and calib)
    assert q.is_enabled == (not disabled)


def test_a_module_is_active_while_any_quantizer_calibrates():
    layer = quanta.prepare(nn.Sequential(nn.Linear(4, 4)))[0]
    for _, q in layer.quantizers():
        q.disable_quant()
    assert not layer.any_quantizer_active()
    layer.input_quantizer.enable_calib()
    assert layer.any_quantizer_active()


def test_private_mode_flags_are_read_only_by_their_owners():
    flag = re.compile(r"\._if_(quant|calib)\b")
    readers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if flag.search(p.read_text())}
    assert readers <= FLAG_OWNERS, f"use TensorQuantizer.quantizing / .active in {sorted(readers - FLAG_OWNERS)}"
