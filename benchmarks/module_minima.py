"""Per-module time of a quantized workload inside the model: the fastest call of each integer module
over many forwards, summed per module type (the least disturbed call: on a shared machine a
whole-forward time mostly measures the other processes). For A/B runs of two source trees on the
same model, ``--save`` once, then ``--load`` that file from each tree (PYTHONPATH=<tree>), in turns.

    python benchmarks/module_minima.py --workload resnet18 --weight-bits 7 --save /tmp/r18.safetensors
    PYTHONPATH=<tree> python benchmarks/module_minima.py --workload resnet18 --load /tmp/r18.safetensors \\
        --batch 1 --threads 1 --forwards 25
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import workloads as W

import quanta

TIMED = ("Int8Conv2d", "Int8Add", "CodesMaxPool2d", "Int8Linear", "Int8Conv1d")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=list(W.workloads()))
    ap.add_argument("--weight-bits", type=int, default=7, help="static_int8's weight_bits (with --save)")
    ap.add_argument("--save", help="quantize the workload (static_int8) and save it here, then exit")
    ap.add_argument("--load", help="a file written by --save")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forwards", type=int, default=25)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    wl = W.workloads()[a.workload]
    if a.save:
        q = quanta.quantize(wl.model().eval(), quanta.preset("static_int8", weight_bits=a.weight_bits),
                            calib_data=list(wl.calib_data()), example=wl.input(min(wl.batches)))
        quanta.save(q.eval(), a.save)
        print(f"saved {a.save}; kept float: {len(quanta.kept_float(q))}")
        return 0
    if not a.load:
        ap.error("give --save or --load")
    q = quanta.load(a.load, wl.model).eval()
    times: dict[str, list[float]] = collections.defaultdict(list)
    start: dict[str, float] = {}
    kinds = {}
    for name, m in q.named_modules():
        if type(m).__name__ in TIMED:
            kinds[name] = type(m).__name__
            m.register_forward_pre_hook(lambda mod, args, name=name: start.__setitem__(name, time.perf_counter()))
            m.register_forward_hook(lambda mod, args, out, name=name: times[name].append(time.perf_counter()
                                                                                         - start[name]))
    x = wl.input(a.batch)
    with torch.inference_mode():
        for _ in range(a.forwards + 1):
            q(x)
    totals: dict[str, float] = collections.defaultdict(float)
    for name, samples in times.items():
        totals[kinds[name]] += min(samples[1:])  # (the first call settles the kernels)
    cells = "  ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(totals.items()))
    print(f"{a.workload} batch {a.batch}, {a.threads} thread(s), ms (sum of per-module minima): {cells}  "
          f"total {sum(totals.values()) * 1e3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
