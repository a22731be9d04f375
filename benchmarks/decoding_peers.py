"""Peer rows of the decoding benchmark: torchao's CPU weight-only flows and bitsandbytes' CPU backend.

Each builder takes the fp32 decoder and returns a quantized copy (the fp32 model is never
changed). Both libraries are optional: `decoding.py` turns an import error or a failing build
into a row that says why. What works on torch 2.13 / torchao 0.18 / bitsandbytes 0.50 on an
x86 CPU (measured here):

- torchao ``Int8WeightOnlyConfig()`` on the bfloat16 model (torchao's documented CPU recipe);
- torchao ``Int4WeightOnlyConfig(group_size=128)``: every packing format of 0.18 needs CUDA or the
  ``mslk`` package (``plain``: "Requires mslk", ``plain_int32``: "does not support device 'cpu'",
  ``tile_packed_to_4d``: CUDA; ``opaque``/Int4CPULayout no longer exists): kept as a failed row;
- torchao ``IntxWeightOnlyConfig(int4, PerGroup(128))`` on the bfloat16 model: torchao's CPU int4
  (codes kept one per int8 byte, dequantized at each call);
- bitsandbytes ``Linear4bit`` (NF4, blocksize 64, bfloat16 compute) and ``Linear8bitLt``
  (LLM.int8, ``threshold=6.0`` as transformers' ``BitsAndBytesConfig`` defaults), swapped in for
  every ``nn.Linear``, then ``.to("cpu")`` which quantizes.

Every builder quantizes every ``nn.Linear``, the lm_head included (as the quanta rows do).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

Builder = Callable[[nn.Module], nn.Module]


def torchao_builders() -> list[tuple[str, Builder]]:
    def with_config(make_config: Callable[[], object]) -> Builder:
        def build(model: nn.Module) -> nn.Module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao.quantization import quantize_
                q = copy.deepcopy(model).to(torch.bfloat16)
                quantize_(q, make_config())
            return q
        return build

    def int8() -> object:
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig(set_inductor_config=False)

    def int4() -> object:
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)

    def intx4() -> object:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))

    return [
        ("torchao Int8WeightOnlyConfig() (bf16 model)", with_config(int8)),
        ("torchao Int4WeightOnlyConfig(group_size=128) (bf16 model)", with_config(int4)),
        ("torchao IntxWeightOnlyConfig(int4, PerGroup(128)) (bf16 model)", with_config(intx4)),
    ]


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    q = copy.deepcopy(model)
    targets = [(name, m) for name, m in q.named_modules() if type(m) is nn.Linear]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent_name) if parent_name else q, child, make(lin))
    return q.to("cpu")  # bitsandbytes quantizes its parameters on the move to a device


def bitsandbytes_builders() -> list[tuple[str, Builder]]:
    def nf4(model: nn.Module) -> nn.Module:
        import bitsandbytes as bnb

        def make(lin: nn.Linear) -> nn.Module:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=torch.bfloat16, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=64)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            return new
        return _swap_linears(model, make)

    def int8(model: nn.Module) -> nn.Module:
        import bitsandbytes as bnb

        def make(lin: nn.Linear) -> nn.Module:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            return new
        return _swap_linears(model, make)

    return [
        ("bitsandbytes Linear4bit nf4 (blocksize 64, bf16 compute)", nf4),
        ("bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0)", int8),
    ]


def peer_builders() -> list[tuple[str, Builder]]:
    return torchao_builders() + bitsandbytes_builders()
