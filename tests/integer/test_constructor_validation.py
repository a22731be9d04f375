"""Every integer module's constructor range-checks its arguments before any kernel sees them."""

from __future__ import annotations

import pytest
import torch

from quanta.core import QuantSpec
from quanta.integer.add import Int8Add
from quanta.integer.conv import Int8Conv1d, Int8Conv2d, Int8Conv3d
from quanta.integer.embedding import Int4Embedding, Int8Embedding
from quanta.integer.linear import Int8Linear
from quanta.integer.pooling import CodesMaxPool1d, CodesMaxPool2d, CodesMaxPool3d
from quanta.integer.recurrent import DynamicInt8GRUCell, DynamicInt8LSTM, DynamicInt8RNN
from quanta.integer.validate import check_geometry_kwargs
from quanta.integer.weight_only import HalfLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear

BAD = [
    ("conv2d stride 0", lambda: Int8Conv2d(1, 8, 3, stride=0), "stride must be in 1"),
    ("conv2d stride [1, 0]", lambda: Int8Conv2d(1, 8, 3, stride=[1, 0]), "stride must be in 1"),
    ("conv1d negative padding", lambda: Int8Conv1d(4, 4, 3, padding=-1), "padding must be in 0"),
    ("conv3d dilation 0", lambda: Int8Conv3d(2, 2, 1, dilation=0), "dilation must be in 1"),
    ("conv2d kernel 0", lambda: Int8Conv2d(2, 2, 0), "kernel_size must be in 1"),
    ("conv2d 3 kernel values", lambda: Int8Conv2d(2, 2, (3, 3, 3)), "kernel_size needs an int or 2 ints"),
    ("conv2d float stride", lambda: Int8Conv2d(2, 2, 3, stride=1.5), "stride needs an int or 2 ints"),
    ("conv2d groups", lambda: Int8Conv2d(6, 8, 3, groups=4), "in_channels 6 must be divisible by groups=4"),
    ("conv2d groups 0", lambda: Int8Conv2d(6, 8, 3, groups=0), "groups must be in 1"),
    ("conv2d bias 'no'", lambda: Int8Conv2d(2, 2, 3, bias="no"), "bias must be True or False"),
    ("conv2d post_op", lambda: Int8Conv2d(2, 2, 3, post_op="swish"), "post_op must be one of"),
    ("conv2d output", lambda: Int8Conv2d(2, 2, 3, output="int4"), "output kind must be one of"),
    ("conv2d huge channels", lambda: Int8Conv2d(2**40, 2, 1), "in_channels must be in 1"),
    ("linear 0 features", lambda: Int8Linear(0, 4), "in_features must be in 1"),
    ("linear float features", lambda: Int8Linear(3.5, 4), "in_features must be an int"),
    ("linear weight bits 9", lambda: Int8Linear(4, 4, weight_bits=9), "weight_bits must be an int in 2..8"),
    ("linear weight bits True", lambda: Int8Linear(4, 4, weight_bits=True), "weight_bits must be an int"),
    ("linear post_op", lambda: Int8Linear(4, 4, post_op=["relu"]), "post_op must be one of"),
    ("linear act spec type", lambda: Int8Linear(4, 4, act_spec={"bits": 8}), "act_spec must be a QuantSpec"),
    ("linear output spec per channel", lambda: Int8Linear(4, 4, output_spec=QuantSpec(granularity="per_channel",
                                                                                        axis=1)),
     "output_spec must be per tensor or per token"),
    ("int8 weight-only bias", lambda: Int8WeightOnlyLinear(4, 4, bias=None), "bias must be True or False"),
    ("int4 group above features", lambda: Int4WeightOnlyLinear(8, 4, group_size=16), "must divide in_features"),
    ("int4 group 0", lambda: Int4WeightOnlyLinear(8, 4, group_size=0), "group_size must be in 1"),
    ("int4 signed 'yes'", lambda: Int4WeightOnlyLinear(8, 4, group_size=8, signed="yes"), "signed must be True"),
    ("half linear dtype", lambda: HalfLinear(4, 4, dtype=torch.float32), "dtype must be float16 or bfloat16"),
    ("embedding 0 rows", lambda: Int8Embedding(0, 4), "num_embeddings must be in 1"),
    ("embedding padding_idx", lambda: Int8Embedding(4, 4, padding_idx=4), "padding_idx must be below"),
    ("int4 embedding group", lambda: Int4Embedding(4, 8, group_size=3), "does not divide embedding_dim"),
    ("lstm 0 layers", lambda: DynamicInt8LSTM(4, 4, num_layers=0), "num_layers must be in 1"),
    ("lstm hidden -1", lambda: DynamicInt8LSTM(4, -1), "hidden_size must be in 1"),
    ("lstm bidirectional 2", lambda: DynamicInt8LSTM(4, 4, bidirectional=2), "bidirectional must be True"),
    ("rnn nonlinearity", lambda: DynamicInt8RNN(4, 4, nonlinearity="sigmoid"), "nonlinearity must be one of"),
    ("gru cell bias", lambda: DynamicInt8GRUCell(4, 4, bias=1), "bias must be True or False"),
    ("add post_op", lambda: Int8Add(post_op="gelu"), "post_op must be one of"),
    ("add spec type", lambda: Int8Add(input_spec="uint8"), "input_spec must be a QuantSpec"),
    ("add uint8 grid of infinite scale", lambda: Int8Add().set_output("uint8", float("inf"), 3),
     "scale must be positive and finite"),
    ("add uint8 grid of fractional zero point", lambda: Int8Add().set_output("uint8", 0.1, 3.5),
     "uint8 zero_point must be an int in"),
    ("conv uint8 grid without zero point", lambda: Int8Conv2d(2, 2, 1).set_output("uint8", 0.1),
     "needs the consumers' scale and zero_point"),
    ("pool1d stride 0", lambda: CodesMaxPool1d(2, stride=0), "stride must be in 1"),
    ("pool2d stride 0", lambda: CodesMaxPool2d(3, stride=[0, 1]), "stride must be in 1"),
    ("pool2d padding above half kernel", lambda: CodesMaxPool2d(3, padding=2), "at most half of kernel_size"),
    ("pool3d dilation 0", lambda: CodesMaxPool3d(2, dilation=0), "dilation must be in 1"),
]


@pytest.mark.parametrize("build,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_constructor_arguments_are_refused(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_valid_edges_still_construct():
    Int8Conv2d(8, 8, 3, stride=2, padding=0, dilation=2, groups=8, bias=False)  # depthwise, strided
    Int8Conv1d(4, 4, 1, padding=[0])
    Int8Linear(1, 1, weight_bits=2)
    Int4WeightOnlyLinear(8, 4, group_size=8, symmetric=False, signed=False)
    Int8Embedding(4, 4, padding_idx=-4)
    CodesMaxPool2d(3, stride=None, padding=1)
    DynamicInt8LSTM(4, 4, num_layers=2, bidirectional=True)


def test_a_strided_pool_of_stride_zero_never_reaches_the_native_kernel():
    # (before the checks: the native max-pool divided by the stride: SIGFPE)
    with pytest.raises(ValueError, match="stride"):
        CodesMaxPool2d(2, stride=0)(torch.zeros(1, 4, 8, 8, dtype=torch.uint8).contiguous(
            memory_format=torch.channels_last))


@pytest.mark.parametrize("kwargs,match", [({"stride": [1, 0]}, "stride must be in 1"),
                                          ({"padding": -2}, "padding must be in 0"),
                                          ({"groups": 0}, "groups must be in 1"),
                                          ({"kernel_size": [3, 3, 3, 3]}, "1 to 3 values"),
                                          ({"out_features": "8"}, "out_features must be an int")])
def test_geometry_of_any_constructor_record_is_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_geometry_kwargs("Conv2d", {"in_channels": 1, **kwargs})
    check_geometry_kwargs("Conv2d", {"in_channels": 1, "padding": "same", "stride": None})


@pytest.mark.parametrize("kwargs", [dict(stride=0), dict(padding=-1), dict(dilation=0), dict(groups=3),
                                    dict(kernel_size=0), dict(bias="yes")], ids=str)
def test_dynamic_conv_constructor_ranges(kwargs):
    from quanta.integer.dynamic_conv import DynamicInt8Conv2d

    args = dict(in_channels=4, out_channels=8, kernel_size=3) | kwargs
    with pytest.raises((ValueError, TypeError), match="DynamicInt8Conv2d"):
        DynamicInt8Conv2d(**args)
