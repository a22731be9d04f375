"""A small Llama-style decoder LM (transformers' `LlamaForCausalLM`: RMSNorm, rotary, SwiGLU) on
bytes of real text: the Python standard library's `pydoc_data.topics` (the language reference
as `help()` shows it; on every Python install). Training it takes a few seconds on CPU; the
session fixtures in `conftest.py` train it once.

Tokens are bytes (vocabulary 256); uniform guessing has perplexity 256."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

SEQ_LEN = 64


def topic_bytes() -> torch.Tensor:
    """Every `pydoc_data.topics` entry (sorted by key) as UTF-8 bytes, one long int64 tensor
    (~465k tokens)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class TextSplit(NamedTuple):
    train: torch.Tensor  # 1-D byte tokens
    held_out: torch.Tensor  # 1-D byte tokens, never trained on (the last `held_out_fraction` of the text)


def split_text(tokens: torch.Tensor, held_out_fraction: float = 0.1) -> TextSplit:
    cut = int(len(tokens) * (1 - held_out_fraction))
    return TextSplit(tokens[:cut], tokens[cut:])


def windows(tokens: torch.Tensor, count: int, seq_len: int = SEQ_LEN, *, seed: int | None = None) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens, ``[count, seq_len]``: at random offsets (``seed``)
    or, with ``seed=None``, consecutive non-overlapping from the start."""
    if seed is None:
        n = min(count, len(tokens) // seq_len)
        return tokens[: n * seq_len].view(n, seq_len).clone()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=g)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def build_llama(hidden: int = 128, layers: int = 2, intermediate: int = 384, heads: int = 4, seed: int = 0) -> nn.Module:
    """An untrained `LlamaForCausalLM` on bytes (untied embeddings; the lm_head is a Linear)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=SEQ_LEN * 2,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def train_lm(model: nn.Module, tokens: torch.Tensor, *, steps: int = 120, batch: int = 16, lr: float = 5e-3,
             seed: int = 0) -> nn.Module:
    """Next-byte training with AdamW and a cosine schedule on random windows of ``tokens``;
    returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (batch,), generator=g)
        x = torch.stack([tokens[s: s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch: int = 32) -> float:
    """``exp`` of the mean next-token cross entropy of ``model`` over ``tokens`` (``[n, seq_len]``
    windows, each predicted from its own prefix)."""
    total, count = 0.0, 0
    for x in tokens.split(batch):
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + float(nll), count + x[:, 1:].numel()
    return math.exp(total / count)
