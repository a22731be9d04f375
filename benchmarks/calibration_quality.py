"""Calibration methods compared on trained models: accuracy and logit SQNR against fp32.

    python benchmarks/calibration_quality.py [--hf]

Prints one Markdown table (the README's calibrator section quotes it). The models are the test
suite's (same data, seeds and training: tests/conftest.py), plus the random Conv-ReLU6-Conv-ReLU-
Conv net of issue 24 on N(0, 1) inputs (2 calibration batches of 4x3x224x224), and with
``--hf`` a Hugging Face BERT classifier (1 layer, hidden 32) trained on the same token task.
Activations: the ``static_int8`` preset's affine uint8, and signed symmetric int8; weights int8
per output channel. Quality only: nothing here is timed.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import quanta
from quanta import demo
from quanta.nn import LayerQuantConfig, QuantDescriptor

METHODS = ("max", "moving_average", "percentile", "mse", "entropy")
GRIDS = {
    "uint8 affine": lambda: quanta.preset("static_int8"),
    "int8 symmetric": lambda: quanta.QuantConfig(
        default=LayerQuantConfig(input=QuantDescriptor(), weight=QuantDescriptor(per_channel=True, narrow_range=True)),
        fold_bn=True),
}


class _Logits(nn.Module):
    """A Hugging Face classifier called with token ids, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum()))


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return demo.train_classifier(model, x, y, seed=0, **kwargs).eval()


def _cases(hf: bool):
    """``(name, model, calibration batches, test inputs, test labels or None)``."""
    x_train, y_train, x_test, y_test = demo.digits(seed=0)
    torch.manual_seed(0)
    yield "digits CNN", _trained(demo.DigitsCNN(), x_train, y_train, epochs=8), \
        [x_train[i * 64:(i + 1) * 64] for i in range(4)], x_test, y_test
    tokens, labels = demo.majority_tokens(n=2000, length=16, seed=0)
    calib = [tokens[i * 64:(i + 1) * 64] for i in range(4)]
    torch.manual_seed(0)
    transformer = _trained(demo.TinyTransformer(), tokens[:1500], labels[:1500], epochs=6, lr=3e-3)
    yield "transformer (nn.TransformerEncoderLayer)", transformer, calib, tokens[1500:], labels[1500:]
    if hf:
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=16, num_labels=4,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        bert = _trained(_Logits(transformers.BertForSequenceClassification(config)), tokens[:1500], labels[:1500],
                        epochs=6, lr=3e-3)
        yield "HF BERT classifier", bert, calib, tokens[1500:], labels[1500:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 8, 3, padding=1)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    yield "random conv net (issue 24)", net, batches, torch.randn(2, 3, 224, 224, generator=g), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true", help="also a Hugging Face BERT classifier (needs transformers)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | activations | fp32 | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for name, model, calib, x_test, y_test in _cases(args.hf):
        with torch.no_grad():
            ref = model(x_test)
        fp32 = "—" if y_test is None else f"{demo.accuracy(model, x_test, y_test):.1f} %"
        for grid, config in GRIDS.items():
            cells = []
            for method in METHODS:
                sim = quanta.calibrate(quanta.prepare(model, config()), calib, method, progress=False)
                with torch.no_grad():
                    sqnr = _sqnr_db(ref, sim(x_test))
                acc = "" if y_test is None else f"{demo.accuracy(sim, x_test, y_test):.1f} % / "
                cells.append(f"{acc}{sqnr:.1f} dB")
            print(f"| {name} | {grid} | {fp32} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
