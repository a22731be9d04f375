"""The decoder, one row's measurement (build, memory, warm-up) and the prefill / decode runner
of the decoding benchmark (`decoding.py`)."""

from __future__ import annotations

import ctypes
import gc
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from methods import short_error, state_dict_bytes
from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 12
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 32000
    prompt: int = 128
    new_tokens: int = 32

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (one from the prefill, the rest decoded), got {self.new_tokens}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide by heads ({self.heads}), "
                             f"heads by kv_heads ({self.kv_heads})")


QUICK = DecoderShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=2048, prompt=32, new_tokens=8)


def llama_config(shape: DecoderShape) -> Any:
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def build_decoder(shape: DecoderShape) -> nn.Module:
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape)).eval()


# ---------------------------------------------------------------- memory (Linux /proc)
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith(key + ":")), None)
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS (else a later row reuses an earlier row's freed pages and its
    growth reads low), then reset the kernel's peak-RSS mark (VmHWM) so the next build's peak can be read."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cache_bytes(cache: Any) -> int:
    layers = getattr(cache, "layers", None)
    pairs = [(lay.keys, lay.values) for lay in layers] if layers is not None else list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if isinstance(t, torch.Tensor))


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return out.past_key_values if cache is None else cache


def _rewind(cache: Any, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


# ---------------------------------------------------------------- one row
class DecodeRunner:
    """Prefill once (full logits and the cache for accuracy and for decoding), then timed calls."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
        self.model, self.prompt, self.steps = model, prompt, new_tokens - 1
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
        self.logits = out.logits.float()
        self.cache = _cache_of(out)
        # transformers 5.x calls the argument `cache` (`past_key_values` deprecated); older ones `past_key_values`
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.first = out.logits[:, -1:].argmax(-1)
        self.kv_bytes_per_token = cache_bytes(self.cache) / prompt.shape[1]

    def prefill(self) -> Any:
        return self.model(input_ids=self.prompt, use_cache=True, logits_to_keep=1)

    def decode(self) -> list[int]:
        tok, tokens = self.first, [int(self.first)]
        try:
            for _ in range(self.steps):
                out = self.model(input_ids=tok, use_cache=True, **{self.cache_arg: self.cache})
                tok = out.logits[:, -1:].argmax(-1)
                tokens.append(int(tok))
        finally:
            _rewind(self.cache, self.prompt.shape[1])
        return tokens


@dataclass
class Row:
    name: str
    group: str  # "fp32" | "float" | "quanta" | "peer"
    note: str = ""
    error: str = ""
    runner: DecodeRunner | None = None
    tokens: list[int] = field(default_factory=list)
    weight_bytes: int | None = None
    peak_growth_kb: int | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    rounds: int = 0


def measure_row(name: str, group: str, build: Callable[[], nn.Module], prompt: torch.Tensor,
                new_tokens: int, note: str = "", size: Callable[[nn.Module], int] = state_dict_bytes) -> Row:
    """Build the row and warm it up (one prefill, one decode), recording the peak RSS growth."""
    gc.collect()
    has_peak = reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    row = Row(name, group, note)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build()
            row.weight_bytes = size(model)
            row.runner = DecodeRunner(model, prompt, new_tokens)
            with torch.inference_mode():
                row.tokens = row.runner.decode()
                row.runner.prefill()
    except Exception as e:
        row.error, row.runner = f"failed: {short_error(e)}", None
        return row
    peak = _status_kb("VmHWM")
    if has_peak and peak is not None and rss0 is not None:
        row.peak_growth_kb = max(0, peak - rss0)
    return row
