"""Metric query templates: PromQL with `{{placeholders}}`, checked, then filled per track.

In: the template of a `metric NAME = promql `...` as UNIT` definition and, at
query time, one value per placeholder for one track. Out: diagnostics for a
definition that cannot be used (`check_template`, codes E401-E405 except E404,
which needs the whole policy) and the query text handed to Prometheus
(`render`, `Template.render`; `prometheus_duration` turns a window in seconds
into a `{{window}}` value).

The security decision. Placeholder values come from the cluster: namespace,
Deployment and Service names, a regex over pod names. Whatever they contain,
they must never change what a query means: a workload called
`"}[5m]) or vector(1) #` must not turn "p99 of the canary" into "always 1".
So a value is substituted in exactly two kinds of place:

- Inside a double-quoted PromQL string, escaped the way PromQL (Go) reads
  strings: backslash, quote and every control character become escape
  sequences, so the value can never close the string and decodes to exactly
  itself. (Single-quoted strings are refused: their escapes differ.) In the
  string of a `=~` or `!~` matcher the value is escaped for RE2 first, so it
  matches only itself; `pod_regex` is the exception, being a regex by
  definition (the controller builds it from escaped pod names).
- Where a duration goes (`[{{window}}]`, `[5m:{{interval}}]`,
  `offset {{window}}`), and only from a value that matches Prometheus' duration
  syntax (ASCII digits and unit letters), which cannot start another token.

Anywhere else a placeholder is an error (E402). `check_template` reports it
when the policy is checked and `render` refuses it again rather than emit an
unsafe query, because a template may reach `render` without a check (the
provider catalogs). Hence no value can change the structure of a query, only
the contents of the strings and durations the template's author wrote.

`parse_template` is the one tokeniser: it splits a template into text and
placeholders and records where each placeholder stands (label value, regex,
duration, elsewhere). Checking and rendering both use it, so they cannot
disagree about a template. It follows PromQL's lexer for what matters here:
`"..."` and `'...'` strings with Go escapes and no raw newline, `#` comments
to the end of the line (inert: a `{{` there is plain text), and brackets.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from dsl.ast import Dim, MetricDef, Span
from dsl.builtins import UNIT_NAMES
from dsl.diagnostics import Diagnostic
from dsl.units import closest

PLACEHOLDERS: dict[str, str] = {
    "namespace": "namespace of the rollout",
    "workload": "the Deployment of the track",
    "track": "canary or stable",
    "service": "the Service in front of the workload",
    "pod_regex": "a regular expression matching the pods of the track",
    "window": "a Prometheus range duration such as 1m",
    "interval": "the evaluation interval, as a Prometheus duration",
}
DURATION_PLACEHOLDERS = frozenset({"window", "interval"})
REGEX_PLACEHOLDERS = frozenset({"pod_regex"})


class Place(Enum):
    """Where a placeholder stands in the query, which decides how it is filled."""

    LABEL = "a double-quoted string"
    REGEX = "the string of a `=~` or `!~` matcher"
    DURATION = "a duration"
    SINGLE_QUOTED = "a single-quoted string"
    BARE = "the query text, outside any string"


@dataclass(frozen=True, slots=True)
class Text:
    """Query text copied as written; `start` is its offset in the template."""

    text: str
    start: int


@dataclass(frozen=True, slots=True)
class Placeholder:
    """`{{name}}` at [start, end) of the template (braces included), and its place."""

    name: str
    start: int
    end: int
    place: Place


Segment = Text | Placeholder


class TemplateError(ValueError):
    """A template that cannot be used; offsets are relative to the template text.

    `start == -1` and `end == len(text) + 1` cover the backticks around it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        start: int,
        end: int,
        help: str | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.start = start
        self.end = end
        self.help = help
        self.label = label

    def diagnostic(self, template_start: int) -> Diagnostic:
        """As a diagnostic of a policy whose template text begins at `template_start`."""
        span = Span(template_start + self.start, template_start + self.end)
        return Diagnostic(self.code, self.message, span, label=self.label, help=self.help)


# --- tokenising ------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{([^{}\n]*)\}\}")
_SPACE = " \t\r\n"  # PromQL's whitespace; str.isspace would also take U+2028 and friends
_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
# (number of digits, base, largest value), as PromQL's lexer reads them
_NUMERIC_ESCAPES = {
    **{d: (3, 8, 0xFF) for d in "01234567"},
    "x": (2, 16, 0xFF),
    "u": (4, 16, 0x10FFFF),
    "U": (8, 16, 0x10FFFF),
}
# `offset` then a space or a minus sign (`offset5m` would lex as one identifier)
_OFFSET_BEFORE = re.compile(r"(?<![\w:])offset(?:[ \t\r\n]+|[ \t\r\n]*-[ \t\r\n]*)\Z", re.I)
_GLUED_AFTER = re.compile(r"[A-Za-z0-9_.{]")
# How far back a placeholder's context is read: enough for `=~ "`, `[` or
# `offset `; a placeholder after more blank space than this counts as bare (refused).
_LOOK_BEHIND = 64
# What people call the placeholders elsewhere.
_PLACEHOLDER_SYNONYMS = {
    "deployment": "workload",
    "app": "workload",
    "ns": "namespace",
    "range": "window",
    "rate_interval": "window",
    "pod": "pod_regex",
    "pods": "pod_regex",
}
_CLOSE_STRING = "end it with the quote it starts with"
_ESCAPES_HELP = (
    'PromQL strings know \\a \\b \\f \\n \\r \\t \\v \\\\ \\" '
    "\\NNN (octal) \\xNN \\uNNNN \\UNNNNNNNN"
)


def _malformed(message: str, start: int, end: int, help: str) -> TemplateError:
    return TemplateError("E405", message, start, end, help)


class _Scanner:
    """One pass over a template; raises `TemplateError` (E405) on the first malformation."""

    def __init__(self, text: str) -> None:
        self.text = text
        # The template with string contents and comments blanked: what the code
        # before a position looks like, for the `=~` and `offset` look-behinds.
        # The template with strings blanked out, one character per item, so the
        # look-behinds below read a bounded tail instead of joining it all.
        self.code: list[str] = []
        self.segments: list[Segment] = []
        self.brackets: list[tuple[str, int]] = []
        self.quote: tuple[str, int] | None = None  # the open string's quote and offset
        self.copied = 0  # where the text not yet in a segment begins
        self.empty = True

    def run(self) -> list[Segment]:
        i = 0
        while i < len(self.text):
            i = self._in_string(i) if self.quote else self._in_code(i)
        if self.quote is not None:
            at = self.quote[1]
            raise _malformed("the string is never closed", at, at + 1, _CLOSE_STRING)
        if self.brackets:
            ch, at = self.brackets[-1]
            help = f"close it with `{_OPENERS[ch]}`"
            raise _malformed(f"`{ch}` is never closed", at, at + 1, help)
        if self.empty:
            help = "write a PromQL query between the backticks"
            raise _malformed("the query is empty", -1, len(self.text) + 1, help)
        if self.copied < len(self.text):
            self.segments.append(Text(self.text[self.copied :], self.copied))
        return self.segments

    def _in_code(self, i: int) -> int:
        text, ch = self.text, self.text[i]
        if text.startswith("{{", i):
            return self._placeholder(i)
        if ch == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            self.code.extend(" " * (end - i))
            return end
        if ch in "\"'":
            self.quote = (ch, i)
        elif ch in _OPENERS:
            self.brackets.append((ch, i))
        elif ch in _CLOSERS:
            self._close(ch, i)
        self.empty = self.empty and ch in _SPACE
        self.code.append(ch)
        return i + 1

    def _close(self, ch: str, i: int) -> None:
        if not self.brackets:
            help = f"remove it or open it with `{_CLOSERS[ch]}`"
            raise _malformed(f"`{ch}` closes nothing", i, i + 1, help)
        opener, _ = self.brackets.pop()
        if _OPENERS[opener] != ch:
            help = f"close `{opener}` with `{_OPENERS[opener]}` first"
            raise _malformed(f"`{ch}` where `{opener}` needs closing", i, i + 1, help)

    def _in_string(self, i: int) -> int:
        assert self.quote is not None
        quote, opened = self.quote
        text, ch = self.text, self.text[i]
        if text.startswith("{{", i):
            return self._placeholder(i)
        if ch == "\\":
            return self._escape(i, quote)
        if ch == "\n":  # PromQL strings end on their line
            message = "the string is not closed on its line"
            raise _malformed(message, opened, opened + 1, _CLOSE_STRING)
        if ch == quote:
            self.quote = None
        self.code.append(ch if ch == quote else " ")
        return i + 1

    def _escape(self, i: int, quote: str) -> int:
        """Skip one escape sequence, checked as PromQL's lexer checks it."""
        text = self.text
        nxt = text[i + 1 : i + 2]
        if text.startswith("{{", i + 1):
            # `\` would join the first character of the value into an escape sequence
            message = "a backslash right before a placeholder"
            raise _malformed(message, i, i + 1, "remove the backslash")
        if nxt in _SIMPLE_ESCAPES or nxt == quote:
            end = i + 2
        elif nxt in _NUMERIC_ESCAPES:
            width, base, largest = _NUMERIC_ESCAPES[nxt]
            first = i + 1 if base == 8 else i + 2  # octal has no letter: \101
            end = first + width
            digits = text[first:end]
            allowed = "01234567" if base == 8 else "0123456789abcdefABCDEF"
            if len(digits) < width or any(c not in allowed for c in digits):
                message = f"a malformed escape sequence `{text[i:end]}`"
                raise _malformed(message, i, min(end, len(text)), _ESCAPES_HELP)
            value = int(digits, base)
            if value > largest or 0xD800 <= value < 0xE000:
                message = f"`{text[i:end]}` is not a valid character"
                raise _malformed(message, i, end, _ESCAPES_HELP)
        else:
            shown = f"`\\{nxt}`" if nxt.strip() else "a backslash at the end"
            message = f"unknown escape sequence {shown}"
            raise _malformed(message, i, i + 1 + len(nxt), _ESCAPES_HELP)
        self.code.extend(" " * (end - i))
        return end

    def _placeholder(self, i: int) -> int:
        m = _PLACEHOLDER.match(self.text, i)
        if m is None:
            help = "write a placeholder as {{namespace}}"
            raise _malformed("`{{` is not closed by `}}` on its line", i, i + 2, help)
        if self.copied < i:
            self.segments.append(Text(self.text[self.copied : i], self.copied))
        name = m.group(1).strip(" \t")
        self.segments.append(Placeholder(name, i, m.end(), self._place(m.end())))
        # In code a placeholder is a value; "0" keeps the look-behinds from
        # reading it as an operator or a keyword.
        self.code.extend(("0" if self.quote is None else " ") * (m.end() - i))
        self.copied = m.end()
        self.empty = False
        return m.end()

    def _place(self, end: int) -> Place:
        code = "".join(self.code[-_LOOK_BEHIND:])
        if self.quote is not None:
            quote, opened = self.quote
            if quote == "'":
                return Place.SINGLE_QUOTED
            before = "".join(self.code[max(0, opened - _LOOK_BEHIND) : opened]).rstrip(_SPACE)
            return Place.REGEX if before.endswith(("=~", "!~")) else Place.LABEL
        before = code.rstrip(_SPACE)
        after = self.text[end:].lstrip(_SPACE)
        if self.brackets and self.brackets[-1][0] == "[":
            if before.endswith(("[", ":")) and after.startswith(("]", ":")):
                return Place.DURATION
        elif _OFFSET_BEFORE.search(code) and not _GLUED_AFTER.match(self.text, end):
            return Place.DURATION
        return Place.BARE


def parse_template(text: str) -> list[Segment]:
    """Split a template into `Text` and `Placeholder` segments, in order.

    Raises `TemplateError` (code E405) for a malformed query: empty, an unclosed
    string, unbalanced brackets, a bad escape sequence or an unclosed `{{`.
    Placeholder names and places are judged by `placeholder_problem`.
    """
    return _Scanner(text).run()


def placeholder_problem(p: Placeholder) -> TemplateError | None:
    """Why this placeholder cannot be filled safely (E401, E402), or None."""
    shown = f"`{{{{{p.name}}}}}`"

    def misplaced(message: str, help: str, label: str) -> TemplateError:
        return TemplateError("E402", f"{shown} {message}", p.start, p.end, help, label)

    if p.name not in PLACEHOLDERS:
        near = _PLACEHOLDER_SYNONYMS.get(p.name) or closest(p.name, tuple(PLACEHOLDERS))
        help = (
            f"did you mean `{{{{{near}}}}}`?"
            if near
            else "placeholders are " + ", ".join(PLACEHOLDERS)
        )
        message = f"unknown placeholder {shown}"
        return TemplateError("E401", message, p.start, p.end, help, "not a placeholder")
    if p.name in DURATION_PLACEHOLDERS:
        if p.place is Place.DURATION:
            return None
        help = f"use it as a range `[{{{{{p.name}}}}}]` or after `offset`"
        where = f"must stand where a duration goes, not in {p.place.value}"
        return misplaced(where, help, "not where a duration goes")
    if p.place is Place.SINGLE_QUOTED:
        help = "use double quotes: values are escaped for double-quoted label values"
        return misplaced("stands in a single-quoted string", help, "in single quotes")
    if p.place not in (Place.LABEL, Place.REGEX):
        help = f'values are only substituted inside quotes, as in label="{{{{{p.name}}}}}"'
        label = "outside a quoted label value"
        return misplaced(f"stands {label}", help, label)
    if p.name in REGEX_PLACEHOLDERS and p.place is not Place.REGEX:
        help = f'match with a regex, as in pod=~"{{{{{p.name}}}}}"'
        where = "is a regular expression outside a `=~` or `!~` matcher"
        return misplaced(where, help, "a regex in an exact match")
    return None


def check_template(defn: MetricDef) -> list[Diagnostic]:
    """Diagnostics for a metric definition's query and unit (E401, E402, E403, E405)."""
    diagnostics: list[Diagnostic] = []
    inside = defn.template_span.start + 1  # the backtick comes first
    try:
        segments = parse_template(defn.template)
    except TemplateError as e:
        diagnostics.append(e.diagnostic(inside))
    else:
        for seg in segments:
            problem = placeholder_problem(seg) if isinstance(seg, Placeholder) else None
            if problem is not None:
                diagnostics.append(problem.diagnostic(inside))
    if defn.unit not in UNIT_NAMES:
        near = closest(defn.unit, tuple(UNIT_NAMES))
        help = f"did you mean `{near}`?" if near else "units are " + ", ".join(UNIT_NAMES)
        message = f"unknown unit `{defn.unit}`"
        diagnostics.append(Diagnostic("E403", message, defn.unit_span, help=help))
    return diagnostics


# --- escaping and rendering ---------------------------------------------------------

_SHORT_ESCAPES = {c: "\\" + e for c, e in zip('\a\b\f\n\r\t\v\\"', 'abfnrtv\\"', strict=True)}
_NEEDS_ESCAPE = re.compile(r"[^ !#-\[\]-~]")  # anything but printable ASCII other than \ and "
_RE2_META = re.compile(r"[\\.+*?()|\[\]{}^$]")  # what Go's regexp.QuoteMeta escapes
# ASCII only: `\d` would also take other scripts' digits, which Prometheus rejects.
_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w|y))+", re.ASCII)


def escape_label_value(value: str) -> str:
    """The content of a PromQL double-quoted string that decodes to exactly `value`.

    Go's strconv.Quote rules: short escapes for \\ " and the C escapes, `\\xNN`
    for other ASCII controls, `\\uNNNN` or `\\UNNNNNNNN` for any other
    character that is not printable (C1 controls, format characters such as
    U+202E, line separators). `\\x` would give a raw byte above 0x7f, so it is
    used for ASCII only. Raises ValueError for a lone surrogate, which no UTF-8
    string can hold.
    """
    if not _NEEDS_ESCAPE.search(value):
        return value
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ch == " " or (code >= 0x80 and unicodedata.category(ch)[0] in "LMNPS"):
            out.append(ch)
        elif code < 0x80:
            out.append(ch if " " < ch < "\x7f" else f"\\x{code:02x}")
        elif 0xD800 <= code < 0xE000:
            raise ValueError(f"a lone surrogate U+{code:04X} is not text")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def quote_meta(value: str) -> str:
    """`value` as an RE2 regex matching exactly itself, as Go's regexp.QuoteMeta does."""
    return _RE2_META.sub(r"\\\g<0>", value)


def escape_regex(value: str) -> str:
    """For the string of a `=~`/`!~` matcher: RE2-escape `value`, then quote it as a label value."""
    return escape_label_value(quote_meta(value))


def is_duration(text: str) -> bool:
    """Whether `text` is a Prometheus duration (`5m`, `1m30s`): safe for a `{{window}}` place."""
    return _DURATION.fullmatch(text) is not None


def prometheus_duration(seconds: float) -> str:
    """A window in seconds as a `{{window}}` value: `90` -> `1m30s`, `0.25` -> `250ms`.

    Prometheus durations have whole units, so the window is rounded to the
    millisecond; ValueError when that leaves nothing or the number is not finite.
    """
    if not math.isfinite(seconds) or round(seconds * 1000) <= 0:
        raise ValueError(f"a window must be a positive duration, not {seconds!r} seconds")
    rest = round(seconds * 1000)
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest:
        parts.append(f"{rest}ms")
    return "".join(parts)


def render(template: str, values: Mapping[str, str]) -> str:
    """The query with every placeholder filled; see the module docstring for the rules.

    Raises `TemplateError` (a ValueError) for a template `check_template` rejects,
    ValueError for a `window`/`interval` that is not a Prometheus duration, and
    KeyError naming the first placeholder without a value.
    """
    return _fill(parse_template(template), values)


def _fill(segments: list[Segment] | tuple[Segment, ...], values: Mapping[str, str]) -> str:
    for seg in segments:  # refuse before filling anything
        problem = placeholder_problem(seg) if isinstance(seg, Placeholder) else None
        if problem is not None:
            raise problem
    out: list[str] = []
    for seg in segments:
        if isinstance(seg, Text):
            out.append(seg.text)
            continue
        if seg.name not in values:
            raise KeyError(seg.name)
        value = values[seg.name]
        if not isinstance(value, str):
            raise TypeError(f"the value of {{{{{seg.name}}}}} is not a string: {value!r}")
        if seg.place is Place.DURATION:
            if not _DURATION.fullmatch(value):
                raise ValueError(
                    f"{{{{{seg.name}}}}} must be a Prometheus duration such as 1m, not {value!r}"
                )
            out.append(value)
        elif seg.place is Place.REGEX and seg.name not in REGEX_PLACEHOLDERS:
            out.append(escape_regex(value))
        else:
            out.append(escape_label_value(value))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Template:
    """A query template, checked when made, with the unit of its result.

    `Template(text, dim)` raises `TemplateError` for anything `check_template`
    reports (E401, E402, E405), so a `Template` can always be rendered safely::

        p99 = Template.from_definition(defn)
        query = p99.render({"namespace": "shop", "workload": "checkout-canary", "window": "1m"})
    """

    text: str
    dim: Dim
    placeholders: frozenset[str] = field(init=False)
    segments: tuple[Segment, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        segments = tuple(parse_template(self.text))
        placeholders = [seg for seg in segments if isinstance(seg, Placeholder)]
        for seg in placeholders:
            problem = placeholder_problem(seg)
            if problem is not None:
                raise problem
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "placeholders", frozenset(p.name for p in placeholders))

    @classmethod
    def from_definition(cls, defn: MetricDef) -> Template:
        """The template of a `metric` statement; raises `TemplateError` for its first error."""
        if defn.unit not in UNIT_NAMES:
            raise TemplateError("E403", f"unknown unit `{defn.unit}`", 0, 0)
        return cls(defn.template, UNIT_NAMES[defn.unit])

    def render(self, values: Mapping[str, str]) -> str:
        """The query for one track; raises as `render` does for a missing or bad value."""
        return _fill(self.segments, values)
