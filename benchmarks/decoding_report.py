"""The decoding benchmark's Markdown: header (machine, versions, model, method), table and findings."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex

import torch
from decoding_rows import DecoderShape, Row
from methods import quanta_version
from report import _version, cpu_flags, cpu_model


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f} MiB"


def accuracy(row: Row, ref: Row) -> tuple[str, str, str]:
    """Cosine of the prefill logits, top-1 agreement over the prompt positions, greedy common prefix."""
    if row.runner is None or ref.runner is None:
        return "—", "—", "—"
    a, b = row.runner.logits.flatten(), ref.runner.logits.flatten()
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()  # fp32 sums exceed 1
    top1 = (row.runner.logits.argmax(-1) == ref.runner.logits.argmax(-1)).float().mean().item()
    prefix = next((i for i, (x, y) in enumerate(zip(row.tokens, ref.tokens)) if x != y), len(ref.tokens))
    return f"{cos:.5f}", f"{100 * top1:.1f}%", f"{prefix}/{len(ref.tokens)}"


def table(rows: list[Row], shape: DecoderShape) -> str:
    ref = rows[0]
    out = [("| row | prefill tok/s | decode tok/s | decode vs fp32 | weights | peak RSS growth | KV cache / token "
           "| logits cosine | top-1 = fp32 (prompt) | greedy tokens = fp32 | rounds |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = f"**{r.name}**" if r.group == "quanta" else r.name
        name += f" ({r.note})" if r.note else ""
        if r.error or r.prefill_s is None or r.decode_s is None:
            out.append(f"| {name} | {(r.error or 'not timed').replace('|', '/')} | | | {_mib(r.weight_bytes)} "
                       "| | | | | | |")
            continue
        dec = (shape.new_tokens - 1) / r.decode_s
        vs = f"{ref.decode_s / r.decode_s:.2f}×" if ref.decode_s else "—"
        kv = f"{r.runner.kv_bytes_per_token / 1024:.0f} KiB" if r.runner else "—"
        peak = "—" if r.peak_growth_kb is None else _mib(r.peak_growth_kb * 1024)
        cos, top1, greedy = accuracy(r, ref)
        out.append(f"| {name} | {shape.prompt / r.prefill_s:.1f} | {dec:.2f} | {vs} | {_mib(r.weight_bytes)} "
                   f"| {peak} | {kv} | {cos} | {top1} | {greedy} | {r.rounds} |")
    return "\n".join(out) + "\n"


def weight_bits(name: str) -> int:
    """Weight width a row's name says: 4 for int4 / nf4 rows, else 8 (for quantized rows)."""
    return 4 if any(k in name.lower() for k in ("int4", "nf4")) else 8


def findings(rows: list[Row], shape: DecoderShape) -> list[str]:
    """Plain statements computed from the table: each quanta row against fp32, bf16 and the peers
    (all of them, and those storing weights at the same width), its memory, and the CPU's limits."""
    ok = {r.name: r for r in rows if not r.error and r.decode_s and r.prefill_s}
    fp32, bf16 = ok.get("torch fp32"), ok.get("torch bf16")
    peers = [r for r in ok.values() if r.group == "peer"]
    lines = []
    for r in (r for r in rows if r.group == "quanta"):
        if r.name not in ok:
            lines.append(f"{r.name}: did not run ({r.error}).")
            continue
        parts = [f"decode {fp32.decode_s / r.decode_s:.2f}× fp32" if fp32 else "",
                 f"{bf16.decode_s / r.decode_s:.2f}× bf16" if bf16 else "",
                 f"prefill {fp32.prefill_s / r.prefill_s:.2f}× fp32" if fp32 else ""]
        if peers:
            best = min(peers, key=lambda p: p.decode_s)
            parts.append(f"decode {best.decode_s / r.decode_s:.2f}× the fastest peer ({best.name})")
            bits = weight_bits(r.name)
            same = min((p for p in peers if weight_bits(p.name) == bits), key=lambda p: p.decode_s, default=None)
            if same is not None and same is not best:
                parts.append(f"{same.decode_s / r.decode_s:.2f}× the fastest {bits}-bit peer ({same.name})")
        if r.peak_growth_kb and r.weight_bytes and fp32 and fp32.weight_bytes:
            parts.append(f"building it peaked at {r.peak_growth_kb * 1024 / fp32.weight_bytes:.1f}× the fp32 "
                         "weights of extra resident memory")
        behind = [n for n, x in (("fp32", fp32), ("bf16", bf16)) if x and r.decode_s > x.decode_s]
        behind += [p.name for p in peers if r.decode_s > p.decode_s]
        verdict = (f" Behind on decode: {', '.join(behind)}." if behind else
                   " Ahead of fp32, bf16 and every peer on decode.")
        lines.append(f"{r.name}: " + ", ".join(p for p in parts if p) + "." + verdict)
    flags = cpu_flags()
    if bf16 and fp32 and bf16.decode_s > fp32.decode_s and "avx512_bf16" not in flags and "amx_int8" not in flags:
        lines.append("bf16 decodes slower than fp32 here: this CPU has no AVX512-BF16 / AMX instructions, so bf16 "
                     "matmuls have no native path; on a CPU with them the bf16 and bf16-activation rows gain.")
    cos = {r.name: accuracy(r, rows[0])[0] for r in ok.values() if r.group != "fp32"}
    by_bits = {b: [float(c) for n, c in cos.items() if c != "—" and weight_bits(n) == b and n != "torch bf16"]
               for b in (4, 8)}
    if by_bits[4] and by_bits[8]:
        n = len(rows[0].tokens)
        short = [r.name for r in ok.values() if r.group != "fp32" and r.runner is not None
                 and accuracy(r, rows[0])[2] != f"{n}/{n}"]
        greedy = (f"greedy prefixes shorter than {n}/{n}: {', '.join(short)} (random weights make near-flat logits, "
                  "so one flip ends a prefix)" if short else
                  f"every row's greedy tokens equal fp32's for all {n} tokens; the top-1 column is the finer measure")
        lines.append(f"Accuracy: prefill-logits cosine {min(by_bits[4]):.4f}–{max(by_bits[4]):.4f} for the 4-bit rows "
                     f"vs {min(by_bits[8]):.4f}–{max(by_bits[8]):.4f} for the 8-bit ones; {greedy}. The perplexity of "
                     "trained decoders (round-to-nearest vs GPTQ/AWQ) is measured by the tests, not here.")
    return lines


def header(args: argparse.Namespace, shape: DecoderShape, load: tuple[float, ...], total_s: float) -> str:
    flags = cpu_flags()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# quanta decoding benchmark (batch 1)" + (" — QUICK smoke run, not for quoting" if args.quick else ""),
        "",
        f"- date: {now}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores; {flags})",
        (f"- threads: torch.set_num_threads({args.threads}); load average before / after: "
        f"{load[0]:.2f} / {os.getloadavg()[0]:.2f} (a shared machine: other work may slow every row alike)"),
        (f"- python {platform.python_version()}, torch {torch.__version__}, transformers {_version('transformers')}, "
        f"torchao {_version('torchao')}, bitsandbytes {_version('bitsandbytes')}, quanta {quanta_version()}"),
        "- command: `" + " ".join(shlex.quote(a) for a in ["python", "benchmarks/decoding.py", *args.argv]) + "`",
        (f"- model: `LlamaForCausalLM(LlamaConfig(hidden_size={shape.hidden}, intermediate_size={shape.intermediate}, "
        f"num_hidden_layers={shape.layers}, num_attention_heads={shape.heads}, num_key_value_heads={shape.kv_heads}, "
        f"vocab_size={shape.vocab}, max_position_embeddings=4096, tie_word_embeddings=False))`, random weights "
        "(`torch.manual_seed(0)`), eval, `torch.inference_mode()`"),
        (f"- prompt: {shape.prompt} random token ids (seed 1); {shape.new_tokens} new tokens, greedy: 1 from the prefill, "
        f"{shape.new_tokens - 1} decode steps through HF's DynamicCache. prefill tok/s = {shape.prompt} / prefill "
        f"time (`logits_to_keep=1`); decode tok/s = {shape.new_tokens - 1} / decode time; medians of interleaved "
        f"shuffled rounds (benchmarks/timing.py); total wall time {total_s:.0f} s"),
        ("- weights: bytes of the saved state (quanta: `quanta.storage_bytes`; others: state_dict tensors by their "
        "stored components), embeddings included (they stay float: fp32 in the quanta and bitsandbytes rows, "
         "bf16 in torchao's, which quantize the bf16 model); every quantized row "
        "quantizes every Linear, lm_head included; quanta rows use `quanta.quantize(model, preset, "
        "speed_check=False)` so every Linear is integer"),
        ("- peak RSS growth: peak resident memory while building the row (copy + quantize) and running its first "
        "prefill + decode, minus the RSS before (the fp32 row is the model itself: activations and cache only)"),
        "- KV cache / token: bytes of HF's cache after the prefill / prompt length",
        ("- accuracy vs fp32 on the same prompt: cosine of the prefill logits (all positions); top-1 = fp32: "
        "share of prompt positions whose argmax matches; greedy tokens = fp32: length of the common prefix of "
        "the generated tokens (random weights give near-flat logits, where one flip ends the prefix)"),
    ]
    full = DecoderShape()
    if shape != full:
        lines.append(f"- REDUCED configuration: full is {full.layers} layers, prompt {full.prompt}, {full.new_tokens} "
                     f"new tokens (`python benchmarks/decoding.py`); this run: {shape.layers} layers, prompt "
                     f"{shape.prompt}, {shape.new_tokens} new tokens" + (f". {args.note}" if args.note else ""))
    elif args.note:
        lines.append(f"- note: {args.note}")
    if "avx512_vnni" not in flags and "amx_int8" not in flags:
        lines.append("- this CPU has no AVX-512 VNNI / AMX: quanta's weight-only rows run torch's "
                     "`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` on bf16 activations, W8A8 "
                     "(dynamic_int8) runs the `float_sums` kernel (quanta/kernels/linear.py), not VNNI")
    return "\n".join(lines) + "\n"
