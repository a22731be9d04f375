"""GPTQ (Frantar et al. 2022) on a small Llama-style decoder trained on real text, on GPT-2's
Conv1D, and on bad input."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from decoder_lm import perplexity  # noqa: E402


def test_trained_decoder_lm_is_far_below_uniform(trained_llama, lm_eval_windows):
    assert perplexity(trained_llama, lm_eval_windows) < 20  # measured 11.6; uniform guessing: 256
