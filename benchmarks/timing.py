"""Side-by-side timing: warm-up, then interleaved repeats (shuffled rounds), medians.

Every method is timed in the same process on the same input. One round calls each method
once, in an order shuffled per round (seeded: runs are repeatable), so that drift in the
machine (other load, thermal state, turbo) spreads over all methods instead of landing on
whichever ran last, and no method always follows the same one: a method timed right after a
large fp32 run starts with that run's cache and thread state, and a fixed (or merely rotated)
order hands that state to the same method in every round. The number of rounds is
adaptive: enough for every method to get ``min_seconds`` of measured time, bounded by
``min_rounds`` / ``max_rounds`` and an overall ``budget_s``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

Runner = Callable[[], object]


def _time_once(fn: Runner) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Runner],
    min_seconds: float = 1.5,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 120.0,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every method in shuffled rounds; return (seconds per call per method, errors).

    A method that raises during timing is dropped from the rounds and reported in ``errors``.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    start = time.perf_counter()
    rounds = 0
    order = random.Random(0)
    while names and rounds < max_rounds:
        for n in order.sample(names, len(names)):
            try:
                samples[n].append(_time_once(fns[n]))
            except Exception as e:
                errors[n] = f"{type(e).__name__}: {e}"
        for n in errors:
            if n in names:
                names.remove(n)
                samples.pop(n, None)
        rounds += 1
        if rounds < min_rounds or not names:
            continue
        least_measured = min(sum(samples[n]) for n in names)
        if least_measured >= min_seconds or time.perf_counter() - start > budget_s:
            break
    return samples, errors


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)
