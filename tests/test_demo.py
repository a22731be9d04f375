"""`quanta demo` end to end (quick mode): every preset runs, and accuracy holds."""

from __future__ import annotations

from quanta.cli import build_parser
from quanta.demo.run import ALL_INTEGER, PLAN, format_table, run_demo


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "--quick"])
    assert args.command == "demo" and args.quick


def test_quick_demo_runs_every_preset_and_keeps_accuracy():
    lines: list[str] = []
    rows = run_demo(quick=True, log=lines.append, progress=False)
    assert [(r.model, r.preset) for r in rows] == [(m, p) for m, presets in PLAN.items() for p in presets]
    for r in rows:
        assert r.latency_ms > 0 and r.size_bytes > 0
        preset = r.preset.removesuffix(ALL_INTEGER)
        if preset in ("static_int8", "dynamic_int8", "weight_only_int8", "fp16", "bf16"):
            assert r.delta >= -2.0, r  # int8 / half keep task accuracy on these trained models
        if r.preset.endswith(ALL_INTEGER):
            assert r.size_ratio < 0.7, r
            done, total = map(int, r.integer_layers.split("/"))
            assert done == total > 0, r
        elif r.preset != "fp32":  # speed-checked: some layers may have stayed float
            done, total = map(int, r.integer_layers.split("/"))
            assert 0 <= done <= total and total > 0, r
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "static_int8" in table
