"""Diagnostics: every problem a policy can have, as a value with a position.

In: a code, a message, a `Span` into the source, an optional caret label and
help. Out: text in the fixed format of LANGUAGE.md section 7::

    path/to/file.rules:3:16: error[E201]: a percentage cannot be compared with a duration
       3 | latency: p99 > 5% for 2m -> rollback
         |                ^^ a percentage cannot be compared with a duration (p99)
         = help: write a duration such as 300ms

Every stage reports through `Diagnostic`; none raises a traceback at a user.
`PolicyError` carries the diagnostics of a policy that cannot be used.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from dsl.ast import Span

# Every code, with a one-line summary. docs/language.md explains each one.
CODES: dict[str, str] = {
    "E001": "syntax error",
    "E002": "the input ends too early",
    "E003": "unknown unit",
    "E004": "number out of range",
    "E005": "input too large or too deeply nested",
    "E101": "unknown metric",
    "E102": "unknown function",
    "E103": "unknown action",
    "E104": "unknown track",
    "E105": "a context value used as a metric",
    "E201": "units that cannot be compared",
    "E202": "units that cannot be combined",
    "E203": "a ratio compared with a number above 1",
    "E204": "the weight compared with a percentage",
    "E205": "a condition where a number is needed, or a number where a condition is needed",
    "E206": "wrong number of arguments",
    "E207": "wrong kind of argument",
    "E301": "duplicate rule name",
    "E302": "`for` is not a positive duration",
    "E303": "a window that is not a positive duration or `last N`",
    "E304": "a window too large to keep",
    "E401": "unknown placeholder in a metric query",
    "E402": "a placeholder outside a quoted label value",
    "E403": "unknown unit name in a metric definition",
    "E404": "a metric defined twice or over a built-in name",
    "E405": "a malformed metric query",
}


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span
    label: str | None = None
    help: str | None = None
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.code not in CODES:  # a programming error, caught by the test suite
            raise ValueError(f"unregistered diagnostic code {self.code}")


class PolicyError(Exception):
    """A policy that cannot be used; `render()` gives the text for the user."""

    def __init__(self, diagnostics: list[Diagnostic], source: str, path: str) -> None:
        super().__init__(f"{path}: {len(diagnostics)} problem(s)")
        self.diagnostics = diagnostics
        self.source = source
        self.path = path

    def render(self) -> str:
        index = LineIndex(self.source)
        return "\n".join(render(d, self.source, self.path, index) for d in self.diagnostics)


class LineIndex:
    """Offsets to 1-based (line, column) pairs."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.starts = [0] + [i + 1 for i, ch in enumerate(source) if ch == "\n"]

    def position(self, offset: int) -> tuple[int, int]:
        line = bisect_right(self.starts, offset) - 1
        return line + 1, offset - self.starts[line] + 1

    def line_text(self, line: int) -> str:
        start = self.starts[line - 1]
        end = self.source.find("\n", start)
        return self.source[start : end if end >= 0 else len(self.source)]


_MAX_SHOWN = 100


def render(diag: Diagnostic, source: str, path: str, index: LineIndex | None = None) -> str:
    """The diagnostic in the fixed format: header, source line, caret, help."""
    index = index or LineIndex(source)
    offset = min(max(diag.span.start, 0), len(source))
    line, col = index.position(offset)
    text = index.line_text(line).replace("\t", " ")
    end = min(diag.span.end, index.starts[line - 1] + len(text))
    width = max(1, end - offset)
    shown_col = col
    if len(text) > _MAX_SHOWN:  # show a window of a very long line around the caret
        first = max(0, min(col - 1 - _MAX_SHOWN // 2, len(text) - _MAX_SHOWN))
        text = ("…" if first else "") + text[first : first + _MAX_SHOWN] + "…"
        shown_col = col - first + (1 if first else 0)
        width = min(width, _MAX_SHOWN)
    gutter = " " * len(str(line))
    out = [
        f"{path}:{line}:{col}: {diag.severity}[{diag.code}]: {diag.message}",
        f"   {line} | {text}",
        f"   {gutter} | {' ' * (shown_col - 1)}{'^' * width} {diag.label or diag.message}".rstrip(),
    ]
    if diag.help:
        out.append(f"   {gutter} = help: {diag.help}")
    return "\n".join(out)
