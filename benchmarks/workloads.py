"""Benchmark workloads: architecture-shaped models from plain ``torch.nn``, random weights.

No downloads: every model is built here with a fixed seed. Shapes follow the published
architectures (BERT-base encoder, ResNet-18, MobileNetV2, a 2-layer LSTM, a decoder-style
linear stack) so that the timings stand for the real thing; the weights are random, so the
accuracy column (SQNR vs fp32) reflects the numerics, not a task.

The CNN residual adds go through an ``Add`` module; ``qready_cnn`` swaps each one for a
``FloatFunctional`` so that torch.ao's eager static quantization can quantize them. quanta takes
the models as they are (its ``prepare`` turns provable residual additions into integer
additions). The models built the way users write them (TF-ported convs, a sentence encoder, a
speech encoder) live in ``workloads_real.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class Add(nn.Module):
    """``a + b`` as a module, so that quantization flows can swap it (torch.ao: FloatFunctional)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.add(a, b)


class QAdd(nn.Module):
    """torch.ao eager-ready add: a ``FloatFunctional`` that ``convert`` turns into ``QFunctional``."""

    def __init__(self) -> None:
        super().__init__()
        self.ff = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.ff.add(a, b)


# ---------------------------------------------------------------- BERT-base-shaped encoder
class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.output = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [B, heads, S, d]
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        x = self.ln1(x + self.attn_out(ctx))
        return self.ln2(x + self.output(self.act(self.intermediate(x))))


class BertEncoder(nn.Module):
    """Embedded tokens in ``[B, S, hidden]`` -> hidden states; 12 post-LN layers like HF BERT."""

    def __init__(self, layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------- ResNet-18-shaped CNN
def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, identity))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1, self.bn1 = _conv_bn(3, w, 7, 2)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans, blocks, cin = [w, 2 * w, 4 * w, 8 * w], [], w
        for i, c in enumerate(chans):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.blocks(x)), 1))


# ---------------------------------------------------------------- MobileNetV2-shaped CNN
class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__(*_conv_bn(cin, cout, k, stride, groups), *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [ConvBNAct(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden), ConvBNAct(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.add = Add() if stride == 1 and cin == cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.add is None else self.add(x, self.conv(x))


class MobileNetV2(nn.Module):
    # (expand t, channels c, repeats n, stride s) from the paper, width 1.0
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, cin = [ConvBNAct(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNAct(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- LSTM and linear stack
class LSTMModel(nn.Module):
    def __init__(self, input_size: int = 512, hidden: int = 512, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class LinearStack(nn.Module):
    """Decoder-style: ``depth`` Linear(dim, dim) at one token, bias-free like LLaMA projections."""

    def __init__(self, dim: int = 4096, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(dim, dim, bias=False) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ---------------------------------------------------------------- helpers
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def qready_cnn(model: nn.Module) -> nn.Module:
    """A deep copy whose ``Add`` modules are torch.ao ``FloatFunctional`` adds."""
    model = copy.deepcopy(model)
    for _, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, Add):
                setattr(mod, cname, QAdd())
    return model


def has_conv_subclass(model: nn.Module) -> bool:
    """Whether a model holds convs written as subclasses of ``nn.Conv1d/2d/3d`` (TF ports)."""
    plain = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return any(isinstance(m, plain) and type(m) not in plain for m in model.modules())


def fuse_patterns(model: nn.Module) -> list[list[str]]:
    """Module-name groups for ``torch.ao.quantization.fuse_modules``: conv+bn(+relu)."""
    groups: list[list[str]] = []
    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(mod, BasicBlock):
            groups += [[p + "conv1", p + "bn1", p + "relu1"], [p + "conv2", p + "bn2"]]
            if mod.downsample is not None:
                groups.append([p + "downsample.0", p + "downsample.1"])
        elif isinstance(mod, ResNet18):
            groups.append([p + "conv1", p + "bn1", p + "relu"])
        elif isinstance(mod, ConvBNAct):  # ReLU6 has no fused module; it stays a quantized ReLU6
            groups.append([p + "0", p + "1"])
    return groups


@dataclass
class Workload:
    name: str
    kind: str  # "cnn" | "transformer" | "speech" (conv stem + transformer) | "rnn" | "linear"
    build: Callable[[], nn.Module]
    input_shape: Callable[[int], tuple[int, ...]]  # batch -> input shape
    batches: list[int]
    calib_batch: int = 2
    calib_count: int = 4
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def attention(self) -> bool:
        """A transformer-shaped workload (peers quantize its Linears dynamically, NNCF as TRANSFORMER)."""
        return self.kind in ("transformer", "speech")

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        m = self.build()
        if self.kind == "cnn":
            randomize_batchnorm(m)
        return m.eval()

    def input(self, batch: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape(batch), generator=g)

    def calib_data(self) -> list[torch.Tensor]:
        return [self.input(self.calib_batch, seed=100 + i) for i in range(self.calib_count)]


def workloads(quick: bool = False) -> dict[str, Workload]:
    """All workloads; ``quick`` shrinks them (fewer layers, smaller images) for smoke runs."""
    import workloads_real as R

    if quick:
        ws = [
            Workload("bert", "transformer", lambda: BertEncoder(layers=2), lambda b: (b, 32, 768), [2],
                     notes="BERT-base layer shapes, 2 layers, seq 32 (quick)"),
            Workload("resnet18", "cnn", ResNet18, lambda b: (b, 3, 64, 64), [1],
                     notes="ResNet-18, 64x64 (quick)"),
            Workload("mobilenet_v2", "cnn", MobileNetV2, lambda b: (b, 3, 64, 64), [1],
                     notes="MobileNetV2, 64x64 (quick)"),
            Workload("lstm", "rnn", lambda: LSTMModel(256, 256, 2), lambda b: (b, 16, 256), [1],
                     notes="2-layer LSTM, hidden 256, seq 16 (quick)"),
            Workload("linear_stack", "linear", lambda: LinearStack(1024, 4), lambda b: (b, 1024), [1],
                     notes="4 x Linear(1024, 1024), one token (quick)"),
            Workload("tf_mobile", "cnn", R.TFMobileNet, lambda b: (b, 3, 64, 64), [1],
                     notes="TF-ported MobileNetV2: Conv2d subclasses with TF same padding, x + y adds, 64x64 (quick)"),
            Workload("sentence_encoder", "transformer", lambda: R.SentenceEncoder(layers=2), lambda b: (b, 32, 384),
                     [2], notes="MiniLM-shaped sentence encoder, 2 layers, hidden 384, seq 32, mean pool (quick)"),
            Workload("speech_encoder", "speech", lambda: R.SpeechEncoder(layers=2), lambda b: (b, 80, 100), [1],
                     notes="Conv1d stem + 2 nn.TransformerEncoderLayer(256, 4), 80x100 frames (quick)"),
        ]
        for w in ws:
            w.calib_count = 2
    else:
        ws = [
            Workload("bert", "transformer", BertEncoder, lambda b: (b, 128, 768), [1, 8],
                     notes="BERT-base encoder: 12 layers, hidden 768, 12 heads, FFN 3072, seq 128"),
            Workload("resnet18", "cnn", ResNet18, lambda b: (b, 3, 224, 224), [1, 16],
                     notes="ResNet-18, 224x224"),
            Workload("mobilenet_v2", "cnn", MobileNetV2, lambda b: (b, 3, 224, 224), [1, 16],
                     notes="MobileNetV2 (width 1.0), 224x224"),
            Workload("lstm", "rnn", LSTMModel, lambda b: (b, 64, 512), [1],
                     notes="LSTM: 2 layers, input 512, hidden 512, seq 64"),
            Workload("linear_stack", "linear", LinearStack, lambda b: (b, 4096), [1],
                     notes="decoder-style: 4 x Linear(4096, 4096, bias=False), batch 1, one token"),
            Workload("tf_mobile", "cnn", R.TFMobileNet, lambda b: (b, 3, 224, 224), [1, 8],
                     notes="TF-ported MobileNetV2 (width 1.0): 52 Conv2d subclasses applying TF same padding "
                     "(ZeroPad2d / F.pad, asymmetric at stride 2) before F.conv2d, BN eps 1e-3, ReLU6, x + y "
                     "residual adds, 1001 classes, 224x224"),
            Workload("sentence_encoder", "transformer", R.SentenceEncoder, lambda b: (b, 128, 384), [1, 8],
                     notes="MiniLM-shaped sentence encoder: 6 post-LN layers, hidden 384, 12 heads, FFN 1536, "
                     "seq 128, mean pooling + L2 norm"),
            Workload("speech_encoder", "speech", R.SpeechEncoder, lambda b: (b, 80, 400), [1, 4],
                     notes="speech encoder: 2 x (Conv1d k3 s2 + GELU) over 80 x 400 log-mel-like frames, then "
                     "4 x nn.TransformerEncoderLayer(d_model=256, nhead=4, batch_first=True)"),
        ]
    return {w.name: w for w in ws}
