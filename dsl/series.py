"""Series notation: promtool's `values` text in, a list of samples out.

`parse_series("0.1x2 _ 1+1x2")` gives `[0.1, 0.1, 0.1, None, 1.0, 2.0, 3.0]`:
one float per sample, `None` where the text says there is no sample. The
forms, space-separated, are those of `promtool test rules`:

- `a`: one sample (`3`, `-0.5`, `1e3`);
- `axn`: `a` repeated n+1 times;
- `a+bxn` and `a-bxn`: a, a+b, ..., a+n*b (n+1 samples);
- `_`, `stale`: one missing sample; `_xn`: n+1 missing samples.

Steps are computed in decimal and rounded to a float once, so `0.1+0.1x2`
gives exactly the floats 0.1, 0.2 and 0.3 (repeated float addition would give
0.30000000000000004, and a test comparing with `0.3` would fail for nothing).

`value_at(samples, interval, t)` answers what the series says at time t:
sample i stands at i * interval and holds until the next one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

# Enough for a day of one-second samples and then some; a typo such as
# `1x10000000000` must be an error, not an attempt to allocate the list.
MAX_SAMPLES = 1_000_000

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SAMPLE = re.compile(
    rf"(?P<start>[+-]?{_UNSIGNED})(?:(?:(?P<sign>[+-])(?P<step>{_UNSIGNED}))?x(?P<count>\d+))?"
)
_MISSING = re.compile(r"_(?:x(?P<count>\d+))?|stale")
_TOKEN = re.compile(r"\S+")

_ALLOWED = (
    "write a number (3, -0.5, 1e3), a repetition such as 0.5x4, a series such as "
    "1+2x3 or 10-1x5, `_` or `stale` for a missing sample, or `_x3` for several"
)


class SeriesError(ValueError):
    """A token of a `values` text that is not a sample; `column` is 1-based."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column


def parse_series(text: str) -> list[float | None]:
    """The samples a `values` text describes, `None` for each missing one."""
    samples: list[float | None] = []
    for token in _TOKEN.finditer(text):
        column = token.start() + 1
        new = _expand(token.group(), column)
        if len(samples) + len(new) > MAX_SAMPLES:
            raise SeriesError(
                f"`{token.group()}` makes the series longer than {MAX_SAMPLES} samples", column
            )
        samples.extend(new)
    return samples


def _expand(word: str, column: int) -> list[float | None]:
    missing = _MISSING.fullmatch(word)
    if missing is not None:
        return [None] * _count(missing.group("count"), word, column)
    m = _SAMPLE.fullmatch(word)
    if m is None:
        raise SeriesError(_explain(word), column)
    n = _count(m.group("count"), word, column)
    start = _decimal(m.group("start"), word, column)
    if m.group("sign") is None:
        return [_float(start, word, column)] * n
    step = _decimal(m.group("step"), word, column)
    if m.group("sign") == "-":
        step = -step
    try:
        return [_float(start + i * step, word, column) for i in range(n)]
    except ArithmeticError:  # decimal overflow of an exponent such as 1e999999
        raise SeriesError(f"`{word}` gives a number too large for a sample", column) from None


def _count(digits: str | None, word: str, column: int) -> int:
    """How many samples `xN` stands for: N + 1, as in promtool."""
    if digits is None:
        return 1
    n = int(digits) + 1
    if n > MAX_SAMPLES:
        raise SeriesError(f"`{word}` asks for more than {MAX_SAMPLES} samples", column)
    return n


def _decimal(text: str, word: str, column: int) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # the pattern only admits decimal numbers; kept for safety
        raise SeriesError(f"`{word}` is not a number; {_ALLOWED}", column) from None


def _float(value: Decimal, word: str, column: int) -> float:
    result = float(value)
    if not math.isfinite(result):
        raise SeriesError(f"`{word}` gives a number too large for a sample", column)
    return result


def _explain(word: str) -> str:
    """Why a token is not a sample, in the author's words."""
    if re.fullmatch(rf"[+-]?{_UNSIGNED}[+-]{_UNSIGNED}", word):
        return f"`{word}` needs a count: write `{word}xN` for N + 1 samples"
    if re.fullmatch(rf"(?:[+-]?{_UNSIGNED}(?:[+-]{_UNSIGNED})?|_)x", word):
        return f"`{word}` needs a count after `x`, such as `{word}3`"
    if re.fullmatch(rf"[+-]?{_UNSIGNED}(?:[+-]{_UNSIGNED})?X\d+", word):
        return f"`{word}`: write the repetition with a lowercase `x`"
    if re.fullmatch(rf"[+-]?{_UNSIGNED}[a-zA-Z%]+", word):
        return f"`{word}`: values are plain numbers in base units (seconds, 0..1 ratios, bytes)"
    return f"`{word}` is not a sample; {_ALLOWED}"


def value_at(samples: Sequence[float | None], interval: float, t: float) -> float | None:
    """The value of a series at time t: its newest sample at or before t.

    Sample i stands at i * interval. A missing sample makes the series unknown
    until the next one; after the last sample the series keeps its value (or
    stays unknown when the last one is missing); before the first it is unknown.
    """
    if interval <= 0:
        raise ValueError(f"the sample interval must be positive, not {interval}")
    if t < 0 or not samples:
        return None
    return samples[min(sample_index(interval, t), len(samples) - 1)]


def sample_index(interval: float, t: float) -> int:
    """The index of the newest sample at or before t (t >= 0).

    Times are multiples of the interval computed in floats, so 0.3 / 0.1 may
    come out as 2.9999999999999996; a quotient within a hair of an integer is
    taken as that integer, so a sample is never missed by a rounding error.
    """
    q = t / interval
    nearest = round(q)
    if abs(q - nearest) <= 1e-9 * max(1.0, abs(q)):
        return int(nearest)
    return math.floor(q)
