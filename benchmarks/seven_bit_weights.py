"""fp32 vs static_int8 (8-bit weights) vs static_int8(weight_bits=7), interleaved, per model.

On CPUs without VNNI, 8-bit weights run the exact slow paths (the reference convolution,
``float_sums`` Linears) while 7-bit weights run oneDNN exactly (`quanta.kernels.u8s8_saturation`).
Every int8 layer stays int8 (``speed_check=False``), so the kernels are what is compared.

    python benchmarks/seven_bit_weights.py [--threads N] [--budget S] [--only digits,resnet,ffn]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing
from workloads import ResNet18, randomize_batchnorm

import quanta
from quanta import demo


def _ffn(dim: int = 768, hidden: int = 3072) -> nn.Module:
    """Two transformer FFN blocks (4 Linears), ReLU between."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU(),
                         nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)).eval()


def models() -> dict[str, tuple[nn.Module, torch.Tensor, list[torch.Tensor]]]:
    """name -> (float model, timed input, calibration batches)."""
    torch.manual_seed(0)
    x_train = demo.digits(seed=0)[0]
    cnn = randomize_batchnorm(demo.DigitsCNN())  # (untrained: the timing does not depend on the values)
    resnet = randomize_batchnorm(ResNet18(num_classes=10, width=32)).eval()
    rx = torch.randn(64, 3, 32, 32)
    fx = torch.randn(1024, 768)  # 8 sequences x 128 tokens
    return {
        "digits": (cnn.eval(), x_train[:64], [x_train[i:i + 64] for i in range(0, 256, 64)]),
        "resnet": (resnet, rx, [torch.randn(16, 3, 32, 32) for _ in range(2)]),
        "ffn": (_ffn(), fx, [torch.randn(256, 768) for _ in range(2)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per model")
    ap.add_argument("--only", default="digits,resnet,ffn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from quanta.kernels.linear import ONEDNN_SATURATION

    print(f"threads {args.threads}; oneDNN full range exact: {ONEDNN_SATURATION.exact()}, "
          f"7-bit exact: {ONEDNN_SATURATION.exact(64)}")
    for name, (model, x, calib) in models().items():
        if name not in args.only.split(","):
            continue
        runs = {"fp32": model}
        kernels = {}
        for bits in (8, 7):
            q = quanta.quantize(model, quanta.preset("static_int8", weight_bits=bits), calib, progress=False,
                                speed_check=False)
            runs[f"int8 w{bits}"] = q
            with torch.no_grad():
                q(x)
            counts: collections.Counter[str] = collections.Counter()
            for m in q.modules():
                counts.update(set(getattr(m, "kernel_counts", {})))
            kernels[bits] = dict(counts)
        with torch.no_grad():
            samples, errors = timing.interleaved({k: (lambda m=m, x=x: m(x)) for k, m in runs.items()},
                                                 min_seconds=2.0, budget_s=args.budget)
        ms = {k: timing.median_ms(v) for k, v in samples.items()}
        fp32 = ms["fp32"]
        row = ", ".join(f"{k} {v:.2f} ms ({fp32 / v:.2f}x fp32)" for k, v in ms.items())
        print(f"{name} {tuple(x.shape)}: {row}; rounds {len(samples['fp32'])}; kernels w8 {kernels[8]}, "
              f"w7 {kernels[7]}" + (f"; errors {errors}" if errors else ""))


if __name__ == "__main__":
    main()
