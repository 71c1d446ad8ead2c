"""Units: literal text in, an exact value in base units out; values back to text.

`parse_quantity("1m30s")` gives `(90.0, Dim.DURATION, "m30s")`, the unit being
everything written after the leading number. Conversion runs in
`decimal` and is rounded to a float once at the end, so `99.9%` is exactly the
float `0.999` and `300ms` exactly `0.3` (a float multiplication would give
0.30000000000000004). `format_value` turns base units back into the shortest
readable text (`0.412` seconds -> `412ms`) for explanations.
"""

from __future__ import annotations

import decimal
import itertools
import math
import re
from decimal import Decimal

from dsl.ast import Dim

DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
BYTE_UNITS: dict[str, Decimal] = {
    "B": Decimal(1),
    "KB": Decimal(10) ** 3,
    "kB": Decimal(10) ** 3,
    "MB": Decimal(10) ** 6,
    "GB": Decimal(10) ** 9,
    "TB": Decimal(10) ** 12,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "KiB": Decimal(2) ** 10,
    "MiB": Decimal(2) ** 20,
    "GiB": Decimal(2) ** 30,
    "TiB": Decimal(2) ** 40,
}
ALL_UNITS = [*DURATION_UNITS, "%", *BYTE_UNITS]

_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_CONTEXT = decimal.Context(prec=50, Emax=999999, Emin=-999999)


class UnitError(ValueError):
    """A literal with a unit we do not know, or a malformed compound duration."""

    def __init__(self, message: str, help: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.help = help


def parse_quantity(text: str) -> tuple[float, Dim, str]:
    """Convert a literal to (value in base units, its kind, the unit as written)."""
    m = _NUMBER.match(text)
    if m is None:  # the lexer only hands us text that starts with a number
        raise UnitError(f"`{text}` is not a number")
    number, unit = m.group(), text[m.end() :]
    if unit == "":
        return _finite(Decimal(number), text), Dim.NUMBER, ""
    if unit == "%":
        return _finite(_CONTEXT.multiply(Decimal(number), Decimal("0.01")), text), Dim.RATIO, "%"
    if unit in BYTE_UNITS:
        return _finite(_CONTEXT.multiply(Decimal(number), BYTE_UNITS[unit]), text), Dim.BYTES, unit
    if unit in DURATION_UNITS:
        return _finite(_CONTEXT.multiply(Decimal(number), DURATION_UNITS[unit]), text), (
            Dim.DURATION
        ), unit
    return _compound_duration(text, unit)


def _compound_duration(text: str, unit: str) -> tuple[float, Dim, str]:
    parts = list(_DURATION_PART.finditer(text))
    if parts and "".join(p.group() for p in parts) == text:
        order = list(DURATION_UNITS)
        ranks = [order.index(p.group(2)) for p in parts]
        if any(a <= b for a, b in itertools.pairwise(ranks)):
            raise UnitError(
                f"the parts of the duration `{text}` are not in order",
                "write each unit once, largest first, such as 1h30m or 1m30s",
            )
        total = sum(
            (_CONTEXT.multiply(Decimal(p.group(1)), DURATION_UNITS[p.group(2)]) for p in parts),
            Decimal(0),
        )
        return _finite(total, text), Dim.DURATION, unit
    suggestion = closest(unit, ALL_UNITS)
    raise UnitError(
        f"unknown unit `{unit}` in `{text}`",
        f"did you mean `{suggestion}`?"
        if suggestion
        else "units are ms s m h d (durations), % (ratios) and B KB MB GB Ki Mi Gi (bytes)",
    )


def _finite(value: Decimal, text: str) -> float:
    result = float(value)
    if not math.isfinite(result):
        raise UnitError(f"the number `{text}` is too large")
    return result


def closest(word: str, candidates: list[str] | tuple[str, ...] | frozenset[str]) -> str | None:
    """The candidate nearest to `word` by edit distance, when near enough."""
    best: tuple[int, int, str] | None = None
    for c in sorted(candidates):
        d = _distance(word.lower(), c.lower())
        # between equally distant names, prefer the one whose differing characters are
        # nearest (`p98` -> `p99`, not `p90`)
        near = sum(abs(ord(a) - ord(b)) for a, b in zip(word, c, strict=False))
        if best is None or (d, near) < best[:2]:
            best = (d, near, c)
    if best is None:
        return None
    limit = max(1, min(3, len(word) // 2))
    return best[2] if best[0] <= limit else None


def _distance(a: str, b: str) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def format_duration(seconds: float) -> str:
    """`130` -> `2m10s`, `0.412` -> `412ms`, `0` -> `0s`."""
    if not math.isfinite(seconds) or abs(seconds) >= 1e12:
        return f"{_short(seconds)}s"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_short(seconds * 1000)}ms"
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            n = int(rest // size)
            parts.append(f"{n}{unit}")
            rest -= n * size
    if rest > 1e-9 or not parts:
        parts.append(f"{_short(rest)}s")
    return "".join(parts)


def format_value(value: float | bool | None, dim: Dim) -> str:
    """A value in base units as a person reads it: `412ms`, `1.2%`, `512Mi`, `3`."""
    if value is None:
        return "unknown"
    if isinstance(value, bool) or dim is Dim.BOOL:
        return "true" if value else "false"
    if dim is Dim.DURATION:
        return format_duration(value)
    if dim is Dim.RATIO:
        return f"{_short(value * 100)}%"
    if dim is Dim.BYTES:
        for unit in ("Ti", "Gi", "Mi", "Ki"):
            size = float(BYTE_UNITS[unit])
            if abs(value) >= size:
                return f"{_short(value / size)}{unit}"
        return f"{_short(value)}B"
    if dim is Dim.RATE:
        return f"{_short(value)}/s"
    return _short(value)


def _short(x: float) -> str:
    """Up to 4 significant digits, no trailing zeros: 412.0 -> 412, 0.1234567 -> 0.1235."""
    if not math.isfinite(x):
        return str(x)  # inf, -inf, nan: arithmetic on huge values can overflow
    if abs(x) < 1e15 and x == int(x):
        return str(int(x))
    text = f"{x:.4g}"
    if "e" in text:
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text
