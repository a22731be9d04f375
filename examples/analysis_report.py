"""Error analysis on the digits CNN with one fragile layer: auto_quantize (size and latency
objectives) and the HTML report with plots (the README's picture is its histogram PNG).

    python examples/analysis_report.py [OUT_DIR]     # default: ./report
"""

from __future__ import annotations

import copy
import sys
import time

import torch

import quanta
from quanta import demo
from quanta.demo.train import accuracy


def main(out_dir: str = "report") -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = demo.digits(seed=0)
    torch.set_num_threads(1)
    model = demo.train_classifier(demo.DigitsCNN(), xtr, ytr, seed=0, epochs=8).eval()
    torch.set_num_threads(2)
    fragile = copy.deepcopy(model)
    with torch.no_grad():  # same float function, one fragile layer (as tests/analysis/conftest.py plants it)
        fragile.features[1].weight[3] /= 100
        fragile.features[1].bias[3] /= 100
        fragile.features[3].weight[:, 3] *= 100
    calib = [xtr[i:i + 64] for i in range(0, 256, 64)]

    def test_accuracy(m: torch.nn.Module) -> float:
        return accuracy(m, xte, yte)

    for objective in ("size", "latency"):
        start = time.perf_counter()
        result = quanta.auto_quantize(fragile, calib, test_accuracy, max_drop=0.01,
                                      candidates=("static_int8", "float"), objective=objective)
        print(result)
        print(f"search took {time.perf_counter() - start:.1f} s\n")
    sens = quanta.sensitivity(fragile, "static_int8", calib, test_accuracy)
    q = quanta.quantize(fragile, "static_int8", calib, progress=False)
    files = quanta.report(fragile, q, calib[:2], f"{out_dir}/digits.html", sensitivity=sens, latency=True)
    print("report:", files.html, sorted(p.name for p in files.images.values()))


if __name__ == "__main__":
    main(*sys.argv[1:2])
