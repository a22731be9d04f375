"""A MobileNetV2-style network trained once per session on digits (16×16) for the algorithm tests."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from mobilenet import TinyMobileNetV2, spread_channel_ranges, upsample

from quanta import demo


class Digits16(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits16() -> Digits16:
    x_train, y_train, x_test, y_test = demo.digits(seed=0)
    return Digits16(upsample(x_train), y_train, upsample(x_test), y_test)


@pytest.fixture(scope="session")
def trained_mobilenet(digits16: Digits16) -> TinyMobileNetV2:
    """Trained 6 epochs (96.4% test accuracy), then its channel ranges spread 4× per stage by an
    exact reparametrisation (`spread_channel_ranges`): per-tensor int8 weights then lose ~8 points.
    Tests must copy it before changing it."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = demo.train_classifier(TinyMobileNetV2(), digits16.x_train, digits16.y_train, epochs=6, lr=3e-3)
    finally:
        torch.set_num_threads(before)
    return spread_channel_ranges(model.eval(), spread=4.0)


# --- a small Llama-style decoder LM trained on real text (decoder_lm.py) ---

@pytest.fixture(scope="session")
def lm_text():
    """`pydoc_data.topics` as byte tokens, split 90% train / 10% held out (`decoder_lm.TextSplit`)."""
    from decoder_lm import split_text, topic_bytes

    return split_text(topic_bytes())


@pytest.fixture(scope="session")
def trained_llama(lm_text):
    """`LlamaForCausalLM` (2 layers, hidden 128, SwiGLU 384, 4 heads, byte vocabulary, untied head)
    trained 120 steps × 16 windows of 64 bytes on ``lm_text.train`` (~15-25 s on one busy core):
    held-out perplexity 11.6 (uniform: 256). Tests must copy it before changing it."""
    pytest.importorskip("transformers")
    from decoder_lm import build_llama, train_lm

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_lm(build_llama(), lm_text.train)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lm_eval_windows(lm_text):
    """64 held-out windows of 64 bytes (consecutive, never trained on), for perplexity."""
    from decoder_lm import windows

    return windows(lm_text.held_out, 64)


@pytest.fixture(scope="session")
def lm_calib_windows(lm_text):
    """128 training windows of 64 bytes at random offsets (seed 1), for calibration."""
    from decoder_lm import windows

    return windows(lm_text.train, 128, seed=1)
