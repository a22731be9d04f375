"""QAT under DistributedDataParallel (gloo, CPU, 2 processes): after N steps every rank holds
identical parameters, learned ranges and buffers, and converts to the same integer model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rank_workers import run_ranks
from torch import nn

import quanta
from quanta import demo
from quanta.nn import LayerQuantConfig, QuantDescriptor

STEPS = 8
W4A4 = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=4, unsigned=True),
                                                   weight=QuantDescriptor(num_bits=4)))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x, y = demo.digits(seed=0)[:2]
    torch.manual_seed(0)
    model = demo.DigitsCNN(width=8).train()
    shard = [x[i:i + 32] for i in range(rank * 32, 4 * 32, world * 32)]
    qat = quanta.prepare_qat(model, quanta.QATConfig(config=W4A4, freeze_bn_step=STEPS - 2), data=shard,
                             progress=False)
    start = {k: v.clone() for k, v in qat.state_dict().items()}
    ddp = DistributedDataParallel(qat)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        idx = slice((step * world + rank) * 32, (step * world + rank + 1) * 32)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        opt.step()
    trained = {k: v.clone() for k, v in qat.state_dict().items()}
    quanta.finalize_qat(qat)
    integer = quanta.convert(qat)
    with torch.no_grad():
        logits = integer(x[-64:])
    fsdp_error = None
    try:  # FSDP2 trains a QAT model; finalize_qat names what it needs instead of failing inside
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is not None:
        # torch's FSDP2 refuses 0-d parameters (learned per-tensor ranges) with its own clear error
        sharded = quanta.prepare_qat(demo.DigitsCNN(width=8).train(), quanta.QATConfig(config=W4A4,
                                     learn_ranges=False), data=shard, progress=False)
        fully_shard(sharded)
        nn.functional.cross_entropy(sharded(x[:32]), y[:32]).backward()
        try:
            quanta.finalize_qat(sharded)
        except ValueError as err:
            fsdp_error = str(err)
    torch.save({"start": start, "trained": trained, "logits": logits, "fsdp_error": fsdp_error,
                "integer": {k: v for k, v in integer.state_dict().items() if isinstance(v, torch.Tensor)}}, out)
    dist.destroy_process_group()


def test_ddp_qat_keeps_ranks_identical_and_converts_the_same(tmp_path: Path):
    a, b = run_ranks(__file__, 2, tmp_path, timeout_s=120)
    amax = [k for k in a["trained"] if k.endswith("amax")]
    assert len(amax) >= 8
    assert [k for k in a["trained"] if not torch.equal(a["trained"][k], b["trained"][k])] == []
    assert [k for k in amax if not torch.equal(a["trained"][k], a["start"][k])] != []  # ranges learned
    assert a["integer"].keys() == b["integer"].keys()
    assert [k for k in a["integer"] if not torch.equal(a["integer"][k], b["integer"][k])] == []
    assert torch.equal(a["logits"], b["logits"])
    if hasattr(torch.distributed, "fsdp") and hasattr(torch.distributed.fsdp, "fully_shard"):
        assert "sharded (FSDP2 fully_shard)" in a["fsdp_error"] and "full_state_dict=True" in a["fsdp_error"]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
