"""Decoding speed at batch 1: prefill and decode tokens/s of a Llama-style decoder, fp32 / bf16 /
quanta / peers, with memory and accuracy against fp32.

    python benchmarks/decoding.py                 # 12 layers, hidden 1024 -> results/DECODING.md
    python benchmarks/decoding.py --quick         # shrunk decoder, few rounds (1-2 min) -> results/decoding_quick.md
    python benchmarks/decoding.py --layers 6 --threads 2 --out /tmp/d.md

The decoder is ``transformers.LlamaForCausalLM`` built from a config (random weights,
``torch.manual_seed(0)``, no downloads). Every row is a copy of it: prefill = one forward over the
prompt with ``logits_to_keep=1`` (what ``generate()`` does), decode = ``new_tokens - 1`` greedy
steps of one token each through HF's ``DynamicCache`` (the first new token comes from the
prefill), so every row produces the same number of tokens; the cache is cut back to the prompt
after each decode. The loop gives the same tokens as ``model.generate(do_sample=False,
max_new_tokens=N, min_new_tokens=N)`` (tested). Prefill and decode of all rows are timed in
shuffled interleaved rounds (timing.py); medians. A row that cannot be built or run is a row
saying why, never a crash.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("TQDM_DISABLE", "1")

import timing
import torch
from decoding_peers import peer_builders
from decoding_report import findings, header, table
from decoding_rows import QUICK, DecoderShape, Row, build_decoder, measure_row
from methods import state_dict_bytes
from torch import nn


# ---------------------------------------------------------------- the rows
def quanta_builders() -> list[tuple[str, str, Callable[[nn.Module], nn.Module]]]:
    def q(preset: str, **kw: Any) -> Callable[[nn.Module], nn.Module]:
        def build(model: nn.Module) -> nn.Module:
            import quanta
            return quanta.quantize(model, preset, speed_check=False, progress=False, **kw)
        return build

    return [
        ("quanta weight_only_int8", "int8 per-channel weights, bf16 activations", q("weight_only_int8")),
        ("quanta weight_only_int4 group_size=128", "int4 asymmetric g128 weights, bf16 activations",
         q("weight_only_int4", group_size=128)),
        ("quanta dynamic_int8", "W8A8: int8 weights, int8 activations per token", q("dynamic_int8")),
    ]


def quanta_size(model: nn.Module) -> int:
    from quanta import storage_bytes
    return int(storage_bytes(model))


def row_names() -> list[str]:
    return ["torch fp32", "torch bf16"] + [n for n, _, _ in quanta_builders()] + [n for n, _ in peer_builders()]


def select_rows(only: list[str] | None) -> set[str]:
    """Row names whose name contains one of ``only`` (case-insensitive), fp32 (the reference) always."""
    names = row_names()
    if not only:
        return set(names)
    bad = [o for o in only if not any(o.lower() in n.lower() for n in names)]
    if bad:
        raise ValueError(f"--rows {bad[0]!r} matches no row; rows: {'; '.join(names)}")
    return {n for n in names if n == "torch fp32" or any(o.lower() in n.lower() for o in only)}


def build_rows(model: nn.Module, shape: DecoderShape, prompt: torch.Tensor, log: Callable[[str], None],
               keep: set[str] | None = None) -> list[Row]:
    specs: list[tuple[str, str, str, Callable[[], nn.Module], Callable[[nn.Module], int]]] = [
        ("torch fp32", "fp32", "", lambda: model, state_dict_bytes),
        ("torch bf16", "float", "model.to(torch.bfloat16)",
         lambda: copy.deepcopy(model).to(torch.bfloat16), state_dict_bytes),
    ]
    specs += [(n, "quanta", note, (lambda b=b: b(model)), quanta_size) for n, note, b in quanta_builders()]
    specs += [(n, "peer", "", (lambda b=b: b(model)), state_dict_bytes) for n, b in peer_builders()]
    rows = []
    for name, group, note, build, size in specs:
        if keep is not None and name not in keep:
            continue
        t0 = time.perf_counter()
        row = measure_row(name, group, build, prompt, shape.new_tokens, note, size)
        log(f"  built {name:<62} {time.perf_counter() - t0:6.1f} s  {row.error or 'ok'}")
        rows.append(row)
    return rows


def time_rows(rows: list[Row], budget: dict[str, Any]) -> None:
    runners: dict[str, Callable[[], object]] = {}
    for i, r in enumerate(rows):
        if r.runner is not None:
            runners[f"{i}:prefill"] = r.runner.prefill
            runners[f"{i}:decode"] = r.runner.decode
    with torch.inference_mode():
        samples, errors = timing.interleaved(runners, **budget)
    for key, s in samples.items():
        i, what = key.split(":")
        row = rows[int(i)]
        setattr(row, f"{what}_s", timing.median_ms(s) / 1000.0)
        row.rounds = len(s)
    for key, err in errors.items():
        rows[int(key.split(":")[0])].error = f"failed while timed: {err[:150]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shrunk decoder (2 layers, hidden 256), few rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, help="override the number of decoder layers")
    ap.add_argument("--prompt", type=int, help="prompt length (default 128; quick 32)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per row (default 32; quick 8)")
    ap.add_argument("--rows", action="append", metavar="TEXT", help="only rows whose name contains TEXT "
                    "(repeatable, case-insensitive; fp32 always runs)")
    ap.add_argument("--note", default="", help="a sentence for the report's header (why a run was reduced...)")
    ap.add_argument("--repeats", type=int, help="exactly this many timed rounds")
    ap.add_argument("--out", help="Markdown file (default results/DECODING.md, quick: results/decoding_quick.md)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line the report quotes
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    base = QUICK if args.quick else DecoderShape()
    over = {k: v for k, v in (("layers", args.layers), ("prompt", args.prompt), ("new_tokens", args.new_tokens))
            if v is not None}
    try:
        shape = DecoderShape(**{**base.__dict__, **over})
        keep = select_rows(args.rows)
    except ValueError as e:
        ap.error(str(e))
    out_path = args.out or os.path.join(HERE, "results", "decoding_quick.md" if args.quick else "DECODING.md")
    budget = ({"min_seconds": 0.05, "min_rounds": 2, "max_rounds": 3, "budget_s": 5.0} if args.quick else
              {"min_seconds": 3.0, "min_rounds": 5, "max_rounds": 50, "budget_s": 300.0})
    if args.repeats is not None:
        budget.update(min_rounds=args.repeats, max_rounds=args.repeats)

    torch.set_num_threads(args.threads)
    load, t0 = os.getloadavg(), time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f} s] {s}", flush=True)
    model = build_decoder(shape)
    prompt = torch.randint(0, shape.vocab, (1, shape.prompt), generator=torch.Generator().manual_seed(1))
    log(f"decoder built: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    rows = build_rows(model, shape, prompt, log, keep)
    log("timing prefill and decode, interleaved")
    time_rows(rows, budget)
    text = header(args, shape, load, time.perf_counter() - t0) + "\n" + table(rows, shape)
    text += "\n## What it says\n\n" + "".join(f"- {s}\n" for s in findings(rows, shape))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
