"""Numbers, durations and series written as a policy test file reads them back.

In: floats in base units (samples, context values, times in seconds). Out:
the text to put in a test file (LANGUAGE.md section 8), chosen so that
`codedance test` reads back exactly the value written: `20`, `1e-05`,
`2m30s` or `150.25s`, `0.1x2 0.5x10 _`. Shared by the two commands that
write test files, `codedance backtest --output` and the REPL's `:save`, so
both pin the same values the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from dsl.units import UnitError, format_duration, parse_quantity

# relative tolerance within which a formatted duration counts as the same time
_SAME_TIME = 1e-9


def number_text(value: float) -> str:
    """The exact float as text: `20`, `0.1`, `1e-05` (repr round-trips; `.0` is dropped)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def series_text(values: Sequence[float | None]) -> str:
    """Samples in promtool notation, runs of one value written once: `0.1x2 0.5x10 _`."""
    parts = []
    for value, run in itertools.groupby(values):
        n = len(list(run))
        word = "_" if value is None else number_text(value)
        parts.append(word if n == 1 else f"{word}x{n - 1}")
    return " ".join(parts)


def duration_text(seconds: float) -> str:
    """A time the test file reads back as the same tick: `2m30s`, or else exact seconds."""
    text = format_duration(seconds)
    try:
        back, _, _ = parse_quantity(text)
    except UnitError:
        back = math.nan
    if abs(back - seconds) <= _SAME_TIME * max(1.0, seconds):
        return text
    return f"{number_text(seconds)}s"
