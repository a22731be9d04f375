"""Quantization-aware training under torch.distributed (DDP, gloo on CPU) on scikit-learn's digits.

Run on one machine with two processes::

    torchrun --nproc-per-node 2 examples/qat_distributed.py

or on two machines (run on each, ``--node-rank 0`` / ``1``, ``HOST`` = the first machine)::

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr HOST --master-port 29500 \\
        examples/qat_distributed.py

Without torchrun it runs as one process. Each rank trains the same float CNN (fixed seed), then
post-training 4-bit quantization (weights per tensor, activations unsigned, both 4-bit) is
calibrated across the ranks (every rank gets the ranges of all the shards), then QAT under
DistributedDataParallel on each rank's shard of the training set, then the integer model is
converted. Prints the test accuracy of each on rank 0.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import quanta
from quanta import demo
from quanta.nn import LayerQuantConfig, QuantDescriptor

W4A4 = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(num_bits=4, unsigned=True),
                                                   weight=QuantDescriptor(num_bits=4)), fold_bn=True)


def qat_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, rank: int, world: int) -> None:
    """Adam + cross-entropy on this rank's shard (every ``world``-th sample of a shared shuffle)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    model.train()
    per_rank_batch = max(64 // world, 1)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        mine = perm[rank::world][: len(y) // world]  # same number of steps on every rank
        for i in range(0, len(mine) - per_rank_batch + 1, per_rank_batch):
            idx = mine[i:i + per_rank_batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="QAT epochs (default 2)")
    args = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = demo.digits(seed=0)
    torch.manual_seed(0)
    fp32 = demo.train_classifier(demo.DigitsCNN(), x_train, y_train, epochs=8, seed=0).eval()
    calib = [x_train[i:i + 64] for i in range(rank * 64, 8 * 64, world * 64)]  # this rank's shard of 8 batches

    ptq = quanta.calibrate(quanta.prepare(fp32, W4A4), calib, progress=False)

    model = quanta.prepare_qat(copy.deepcopy(fp32).train(), quanta.QATConfig(config=W4A4, freeze_bn_step=30),
                               data=calib, progress=False)
    trained = DistributedDataParallel(model) if distributed else model
    qat_train(trained, x_train, y_train, args.epochs, rank, world)
    quanta.finalize_qat(model)
    integer = quanta.convert(model)

    if rank == 0:
        acc = {name: demo.accuracy(m, x_test, y_test) for name, m in
               (("fp32", fp32), ("PTQ 4-bit", ptq), ("QAT 4-bit (integer)", integer))}
        print(f"processes: {world}  " + "  ".join(f"{k}: {v:.2f}%" for k, v in acc.items()))
        lost = acc["fp32"] - acc["PTQ 4-bit"]
        if lost > 0:
            print(f"QAT recovers {100 * (acc['QAT 4-bit (integer)'] - acc['PTQ 4-bit']) / lost:.0f}% of the "
                  f"{lost:.2f} points PTQ loses")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
