"""QAT under torch.compile: the compiled simulated model trains and computes what eager does."""

from __future__ import annotations

import copy

import torch
from torch import nn

import quanta
from quanta.nn import LayerQuantConfig, QuantDescriptor

W4A4 = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=4, unsigned=True),
                                                   weight=QuantDescriptor(num_bits=4)), fold_bn=True)


def test_compiled_qat_steps_match_eager(trained_cnn, digits_data):
    config = quanta.QATConfig(config=W4A4, freeze_bn_step=1000)
    eager = quanta.prepare_qat(copy.deepcopy(trained_cnn).train(), config, data=digits_data.calib_batches(4),
                               progress=False)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    loss_fn = nn.CrossEntropyLoss()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, twin)]
    losses = []
    start = 0
    for size in (32, 32, 20):  # a short last batch: recompiled with a symbolic batch size
        x, y = digits_data.x_train[start:start + size], digits_data.y_train[start:start + size]
        start += size
        pair = []
        for model, opt in ((eager, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            pair.append(float(loss.detach()))
        losses.append(pair)
        torch.testing.assert_close(pair[1], pair[0], rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    assert all(torch.isfinite(torch.tensor(pair)).all() for pair in losses)
