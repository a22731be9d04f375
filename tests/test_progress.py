"""quanta.progress: live lines on a terminal only, one clean final line in logs; calibration and
the demo go through it."""

from __future__ import annotations

import io
import re

import pytest
import torch

import quanta
from quanta.progress import Progress, echo, format_seconds, notice


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_no_carriage_returns_and_one_final_line():
    log = io.StringIO()
    with Progress("calibrating", total=3, unit="batch", stream=log) as bar:
        for _ in range(3):
            bar.update()
        assert log.getvalue() == ""  # nothing while it runs
    assert re.fullmatch(r"calibrating: 3 batches in \d+\.\d\d s\n", log.getvalue()), log.getvalue()


@pytest.mark.parametrize("options", [{"enabled": False}, {"leave": False}])
def test_a_disabled_or_transient_bar_prints_nothing_to_a_log(options):
    log = io.StringIO()
    with Progress("quantizing", total=2, stream=log, **options) as bar:
        bar.update(2)
    assert log.getvalue() == ""


def test_a_terminal_gets_a_live_line_then_a_clean_final_line():
    tty = Terminal()
    with Progress("calibrating", total=None, unit="batch", stream=tty, min_interval=0) as bar:
        bar.update()
        assert tty.getvalue().endswith("\rcalibrating: 1 batch [0.00 s]\x1b[K")
        bar.update()
    final = tty.getvalue().rpartition("\r\x1b[K")[2]
    assert re.fullmatch(r"calibrating: 2 batches in \d+\.\d\d s\n", final), final


def test_echo_clears_a_live_bar_and_draws_it_again_below(capsys):
    tty = Terminal()
    with Progress("quantizing", total=4, unit="preset", stream=tty, leave=False, min_interval=0) as bar:
        bar.update()
        echo("| a row |")
        assert tty.getvalue().endswith("\r\x1b[K\rquantizing: 1/4 presets [0.00 s]\x1b[K")
    assert capsys.readouterr().out == "| a row |\n"
    assert tty.getvalue().endswith("\r\x1b[K")  # a transient bar leaves nothing behind
    notice("building")
    assert capsys.readouterr().err == "quanta: building\n"


def test_progress_total_is_validated():
    with pytest.raises(ValueError, match="total must be a non-negative int or None, got -1"):
        Progress("x", total=-1)


@pytest.mark.parametrize("seconds,text", [(0.414, "0.41 s"), (42.2, "42 s"), (185, "3 min 05 s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_calibration_writes_one_clean_line_to_a_log(capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    prepared = quanta.prepare(model)
    quanta.calibrate(prepared, [torch.randn(2, 8) for _ in range(3)])
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^calibrating: 3 batches in \d+\.\d\d s$", err, re.MULTILINE), err
    quanta.calibrate(prepared, [torch.randn(2, 8)], progress=False)
    assert capsys.readouterr().err == ""
