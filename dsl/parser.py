"""Parsing: policy text in, a `Policy` syntax tree or diagnostics out.

The grammar (`grammar.lark`) is LALR(1); lark builds the parse tables once per
process (`_lark()` is cached) and calls `_Builder` at every reduction, so the
tree is built while parsing, without a second recursive pass over a lark tree.
That matters for hostile input: a chain of 50,000 `+` never reaches Python's
recursion limit here, and `MAX_DEPTH` stops trees deep enough to reach it in a
later stage.

Syntax errors are reported in the author's words: `_describe` maps what the
LALR table expected to phrases such as "a duration such as 2m" or "`->` and an
action", never lark terminal names. After an error, the offending line is
blanked and parsing resumes, so one run reports every broken line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lark
from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from dsl import ast
from dsl.ast import Span
from dsl.diagnostics import Diagnostic, LineIndex
from dsl.units import ALL_UNITS, UnitError, parse_quantity

MAX_DEPTH = 100
MAX_SOURCE_BYTES = 1 << 20
MAX_ERRORS = 20


class _TooDeep(Exception):
    def __init__(self, span: Span) -> None:
        self.span = span


KEYWORDS = frozenset(
    {"for", "and", "or", "not", "true", "false", "last", "metric", "promql", "as"}
)


class _KeywordName(Exception):
    def __init__(self, token: Token, what: str) -> None:
        self.token = token
        self.what = what


class _BadLiteral(Exception):
    def __init__(self, token: Token, error: UnitError) -> None:
        self.token = token
        self.error = error


def _span(tok: Token) -> Span:
    start = tok.start_pos or 0
    return Span(start, tok.end_pos if tok.end_pos is not None else start + len(tok))


# Policies repeat their literals (`5m`, `300ms`); exact decimal conversion is not cheap.
_quantity = functools.lru_cache(maxsize=1024)(parse_quantity)


def _checked(node: Any) -> Any:
    if node.depth > MAX_DEPTH:
        raise _TooDeep(node.span)
    return node


class _Builder(lark.Transformer[Token, Any]):
    """Reduction callbacks: lark hands each one the children of a rule."""

    def number(self, c: list[Token]) -> ast.Number:
        tok = c[0]
        try:
            value, dim, unit = _quantity(str(tok))
        except UnitError as e:
            raise _BadLiteral(tok, e) from None
        return ast.Number(value, dim, str(tok), unit, _span(tok))

    def true(self, c: list[Token]) -> ast.Bool:
        return ast.Bool(True, _span(c[0]))

    def false(self, c: list[Token]) -> ast.Bool:
        return ast.Bool(False, _span(c[0]))

    def ref(self, c: list[Token]) -> ast.Ref:
        if len(c) == 1:
            return ast.Ref(str(c[0]), None, _span(c[0]))
        return ast.Ref(str(c[2]), str(c[0]), Span(_span(c[0]).start, _span(c[2]).end))

    def call(self, c: list[Any]) -> ast.Call:
        name, args = c[0], [x for x in c[2:-1] if not isinstance(x, Token)]
        span = Span(name.start_pos, c[-1].end_pos)
        return _checked(ast.Call(str(name), tuple(args), span, _span(name)))  # type: ignore[no-any-return]

    def group(self, c: list[Any]) -> Any:
        # Keep the parentheses in the span so carets cover what the author wrote.
        return _regroup(c[1], c)

    def unary(self, c: list[Any]) -> ast.Unary:
        op, operand = c
        node = ast.Unary(str(op), operand, Span(op.start_pos, operand.span.end))
        return _checked(node)  # type: ignore[no-any-return]

    def binary(self, c: list[Any]) -> ast.Binary:
        left, op, right = c
        # The operands stand left and right of the operator, so no min/max is needed.
        node = ast.Binary(str(op), left, right, Span(left.span.start, right.span.end), _span(op))
        return _checked(node)  # type: ignore[no-any-return]

    def last_n(self, c: list[Token]) -> ast.LastN:
        count = self.number([c[1]])
        return ast.LastN(count, _span(c[0]).cover(count.span))

    def rule(self, c: list[Any]) -> ast.Rule:
        name: Token | None = None
        if isinstance(c[0], Token) and c[0].type == "NAME":
            name, c = c[0], c[2:]
            if str(name) in KEYWORDS:
                raise _KeywordName(name, "a rule")
        cond = c[0]
        for_ = self.number([c[2]]) if len(c) == 5 else None
        action = c[-1]
        start = _span(name) if name is not None else cond.span
        return ast.Rule(
            name=str(name) if name is not None else None,
            condition=cond,
            action=str(action),
            for_=for_,
            span=start.cover(_span(action)),
            name_span=_span(name) if name is not None else cond.span,
            action_span=_span(action),
        )

    def metric_def(self, c: list[Token]) -> ast.MetricDef:
        kw, name, _eq, _promql, template, _as, unit = c
        if str(name) in KEYWORDS:
            raise _KeywordName(name, "a metric")
        return ast.MetricDef(
            name=str(name),
            template=str(template)[1:-1],
            unit=str(unit),
            line=kw.line or 0,
            span=_span(kw).cover(_span(unit)),
            name_span=_span(name),
            template_span=_span(template),
            unit_span=_span(unit),
        )

    def start(self, c: list[Any]) -> ast.Policy:
        return ast.Policy(tuple(x for x in c if not isinstance(x, Token)))


def _regroup(inner: Any, c: list[Any]) -> Any:
    """A parenthesised expression is its inner node with the parentheses in its span."""
    return replace(inner, span=_span(c[0]).cover(_span(c[-1])))


class _ParenNewlines:
    """Post-lexer: a newline inside parentheses continues the statement."""

    # `->` is lexed as one token everywhere, so `p99 > -> rollback` reports the
    # missing value at the arrow instead of reading `-` as a minus sign.
    always_accept = ("_NL", "ARROW")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        for tok in stream:
            if tok.type == "LPAR":
                depth += 1
            elif tok.type == "RPAR":
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@functools.cache
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        transformer=_Builder(),
        postlex=_ParenNewlines(),
        maybe_placeholders=False,
    )


def bare_parser() -> Lark:
    """The same grammar with no tree building: the reference the benchmark compares to."""
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=_ParenNewlines())


def parse(source: str) -> tuple[ast.Policy | None, list[Diagnostic]]:
    """Parse a whole policy. Returns the tree (None if any error) and the diagnostics."""
    if len(source.encode("utf-8", "replace")) > MAX_SOURCE_BYTES:
        return None, [
            Diagnostic(
                "E005",
                f"the policy is larger than {MAX_SOURCE_BYTES >> 20} MiB",
                Span(0, 0),
                help="split it into several files",
            )
        ]
    text = source
    diagnostics: list[Diagnostic] = []
    while len(diagnostics) < MAX_ERRORS:
        try:
            tree = _lark().parse(text)
        except (UnexpectedInput, _TooDeep, _BadLiteral, _KeywordName) as e:
            diag = _diagnose(e, text)
            diagnostics.append(diag)
            blanked = _blank_line(text, diag.span.start)
            if blanked == text:
                break
            text = blanked
            continue
        if diagnostics:
            return None, diagnostics
        assert isinstance(tree, ast.Policy)
        return _with_lines(tree, source), []
    return None, diagnostics


def _blank_line(text: str, offset: int) -> str:
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    end = len(text) if end < 0 else end
    if start == end:  # an empty line: blank the one before (an early end of input)
        start = text.rfind("\n", 0, max(0, start - 1)) + 1
        end = max(start, end - 1) if end == len(text) else end
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _with_lines(tree: ast.Policy, source: str) -> ast.Policy:
    """Fill in each statement's line (lark gave offsets) and collect comments."""
    index = LineIndex(source)
    statements = tuple(
        replace(s, line=index.position(s.span.start)[0]) for s in tree.statements
    )
    return ast.Policy(statements, tuple(_comments(source)))


# A backtick query (skipped: `#` inside it is PromQL) or a comment.
_COMMENT_OR_QUERY = re.compile(r"`[^`]*`?|#[^\n]*")


def _comments(source: str) -> Iterator[ast.Comment]:
    """`#` to the end of the line, outside backtick-quoted queries."""
    line, pos = 1, 0
    for m in _COMMENT_OR_QUERY.finditer(source):
        if m.group().startswith("`"):
            continue
        start = m.start()
        line += source.count("\n", pos, start)
        pos = start
        line_start = source.rfind("\n", 0, start) + 1
        own = source[line_start:start].strip() == ""
        yield ast.Comment(m.group().rstrip(), line, own)


# --- syntax errors in the author's words ---------------------------------------

_WORDS: dict[str, str] = {
    "ARROW": "`->` and an action",
    "FOR": "`for` and a duration",
    "COMPARE": "a comparison such as `>`",
    "AND": "`and`",
    "OR": "`or`",
    "PLUS": "an operator",
    "MINUS": "an operator",
    "STAR": "an operator",
    "SLASH": "an operator",
    "RPAR": "`)`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "EQUALS": "`=`",
    "PROMQL": "`promql`",
    "TEMPLATE": "a query in backticks",
    "AS": "`as` and a unit",
    "NAME": "a name",
    "QUANTITY": "a number",
    "LPAR": "`(`",
    "NOT": "`not`",
    "TRUE": "`true`",
    "FALSE": "`false`",
    "LAST": "`last N`",
    "METRIC": "`metric`",
    "DOT": "`.`",
    "_NL": "the end of the line",
    "$END": "the end of the input",
}

def _describe(expected: set[str], before: str) -> str:
    """What the parser wanted, as a phrase: "a duration such as 2m", "`->` and an action"."""
    word = before.split()[-1] if before.split() else ""
    if expected <= {"QUANTITY"} and word == "for":
        return "a duration such as 2m"
    if expected <= {"QUANTITY"} and word == "last":
        return "a number of evaluations such as 5"
    if expected <= {"NAME"} and word == "->":
        return "an action: rollback, pause, promote or continue"
    if expected <= {"NAME"} and word == "metric":
        return "the name of the metric"
    if expected <= {"NAME"} and word == "as":
        return "a unit: duration, ratio, count, per_second, bytes, cores or number"
    if expected <= {"NAME"} and word.endswith("."):
        return "a metric name such as p99"
    if {"NAME", "QUANTITY"} <= expected and not expected & {"ARROW", "FOR", "COMPARE"}:
        return "a value: a number, a metric, a function call or `(`"
    if "_NL" in expected:
        expected = expected - {"$END"}
    phrases: list[str] = []
    for name in _WORDS:
        if name in expected and _WORDS[name] not in phrases:
            phrases.append(_WORDS[name])
    phrases = phrases[:4]
    if not phrases:
        return "something else"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " or " + phrases[-1]


def _found(tok: Token, text: str) -> str:
    if tok.type == "$END":
        return "the end of the input"
    if tok.type == "_NL":
        return "the end of the line"
    if tok.type == "TEMPLATE":
        return "a query in backticks"
    text = str(tok)
    return f"`{text[:30]}…`" if len(text) > 30 else f"`{text}`"


def _diagnose(e: Exception, text: str) -> Diagnostic:
    if isinstance(e, _TooDeep):
        return Diagnostic(
            "E005",
            f"the expression is nested more than {MAX_DEPTH} levels deep",
            Span(e.span.start, e.span.start + 1),
            help="split it into several rules or metric definitions",
        )
    if isinstance(e, _KeywordName):
        return Diagnostic(
            "E001",
            f"`{e.token}` is a keyword and cannot name {e.what}",
            _span(e.token),
            help=f"choose another name, such as `{e.token}_{e.what.split()[-1]}`",
        )
    if isinstance(e, _BadLiteral):
        code = "E004" if "too large" in e.error.message else "E003"
        return Diagnostic(code, e.error.message, _span(e.token), help=e.error.help)
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream or 0
        ch = text[pos]
        if ch == "`":
            return Diagnostic(
                "E001",
                "the query has no closing backtick",
                Span(pos, pos + 1),
                help="end the PromQL query with `",
            )
        allowed = set(e.allowed or ())
        shown = ch if ch.isprintable() else ascii(ch)[1:-1]  # never echo control codes
        return Diagnostic(
            "E001",
            f"unexpected character `{shown}`",
            Span(pos, pos + 1),
            label=f"expected {_describe(allowed, text[:pos])}",
            help=_char_help(ch),
        )
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    expected = _accepted(e)
    if tok.type == "$END":
        stripped = text.rstrip()
        span = Span(len(stripped), len(stripped) + 1)
    else:
        span = _span(tok)
    before = text[: span.start]
    want = _describe(expected, before)
    ended = tok.type in ("$END", "_NL")
    return Diagnostic(
        "E002" if ended else "E001",
        f"expected {want}, found {_found(tok, text)}",
        span,
        label=f"expected {want}",
        help=_token_help(tok, expected, before),
    )


def _accepted(e: UnexpectedToken) -> set[str]:
    """Exactly the terminals the parser would take here.

    The LALR table's own list is wider (default reductions merge lookaheads),
    so ask the interactive parser, which tries each terminal.
    """
    try:
        if e.interactive_parser is not None:
            accepts: set[str] = e.interactive_parser.accepts()  # type: ignore[no-untyped-call]
            return accepts
    except UnexpectedInput:
        pass
    return set(e.expected)


def _char_help(ch: str) -> str | None:
    return {
        "&": "write `and`",
        "|": "write `or`",
        "!": "write `not`, or `!=` for not equal",
        "=": "write `==` to compare",
        '"': "strings are not part of rules; metric queries go in backticks",
        "'": "strings are not part of rules; metric queries go in backticks",
    }.get(ch)


def _token_help(tok: Token, expected: set[str], before: str) -> str | None:
    if "ARROW" in expected and tok.type in ("$END", "_NL"):
        return "every rule ends with `-> ACTION`, such as `p99 > 300ms for 2m -> rollback`"
    if tok.type == "COMPARE" and "ARROW" in expected:
        return "comparisons do not chain: write `a < b and b < c`"
    if tok.type == "EQUALS":
        return "write `==` to compare"
    if tok.type == "QUANTITY" and before[-1:].isalpha():
        return "give every part of a duration its unit, such as 1m30s"
    if tok.type == "NAME" and str(tok) in ALL_UNITS and before[-2:-1].isdigit():
        return "write a number and its unit without a space, such as 300ms"
    return None
