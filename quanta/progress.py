"""Progress bars and status lines: the one place quanta writes progress, aware of terminals.

On a terminal a `Progress` bar redraws one line in place (at most every 0.1 s) and `echo` /
`notice` lines are printed above it without leaving fragments of the bar behind. Anywhere else
(a log file, a CI job, a pipe, a notebook's captured stderr) nothing is redrawn and no carriage
return is written: a bar prints one plain line when it closes (``calibrating: 8 batches in
0.41 s``) and nothing while it runs.

    with Progress("calibrating", total=8, unit="batch") as bar:
        for batch in data:
            ...
            bar.update()
    echo("a result row")                       # stdout, above any live bar
    notice("building the native kernels ...")  # stderr, prefixed "quanta: "
"""

from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

_live: list[Progress] = []  # bars currently drawn on a terminal, oldest first


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float) -> str:
    """``0.41 s``, ``42 s``, ``3 min 05 s``."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _plural(unit: str, n: int) -> str:
    if n == 1 or not unit:
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


class Progress:
    """A counter with a description: a live line on a terminal, one final line elsewhere.

    ``enabled=False`` prints nothing at all; ``leave=False`` erases the line on a terminal when
    done and prints no final line elsewhere; ``stream`` defaults to ``sys.stderr`` (looked up
    when the bar starts, so that captured streams are honoured)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "step", *, enabled: bool = True,
                 leave: bool = True, stream: IO[str] | None = None, min_interval: float = 0.1) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"Progress total must be a non-negative int or None, got {total!r}")
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled, self.leave, self.min_interval = enabled, leave, min_interval
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and is_terminal(self.stream)
        self.n = 0
        self.start = time.perf_counter()
        self._drawn_at = 0.0
        self._closed = False
        if self.live:
            _live.append(self)
            self._draw()

    def text(self) -> str:
        elapsed = format_seconds(time.perf_counter() - self.start)
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        return f"{self.desc}: {count} {_plural(self.unit, self.n if self.total is None else self.total)} [{elapsed}]"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.live and time.perf_counter() - self._drawn_at >= self.min_interval:
            self._draw()

    def _draw(self) -> None:
        self._drawn_at = time.perf_counter()
        self.stream.write("\r" + self.text() + "\x1b[K")
        self.stream.flush()

    def _erase(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.live:
            _live.remove(self)
            self._erase()
        if self.enabled and self.leave:
            elapsed = format_seconds(time.perf_counter() - self.start)
            self.stream.write(f"{self.desc}: {self.n} {_plural(self.unit, self.n)} in {elapsed}\n")
            self.stream.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo(message: str, stream: IO[str] | None = None) -> None:
    """Print a line (to stdout by default) above any live bar, which is drawn again below it."""
    stream = stream if stream is not None else sys.stdout
    for bar in _live:
        bar._erase()
    stream.write(message + "\n")
    stream.flush()
    for bar in _live:
        bar._draw()


def notice(message: str) -> None:
    """A status line from quanta itself (stderr, ``quanta: `` prefix): builds, waits, fallbacks."""
    echo(f"quanta: {message}", sys.stderr)


__all__ = ["Progress", "echo", "format_seconds", "is_terminal", "notice"]
