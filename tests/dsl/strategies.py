"""Hypothesis strategies: policies the checker accepts, and snapshots to run them on.

`policies()` builds `dsl.ast.Policy` trees bottom up by kind (`Dim`): numeric
expressions of one kind (`expressions_of(Dim.DURATION)` gives `p99`,
`avg(stable.p50, 5m)`, `p99 + 50ms`, `canary.p99 / 2` ...), then conditions that
compare values of compatible kinds, joined with `and`, `or`, `not`, `count`,
`absent`. Every literal is built from its text with `dsl.units.parse_quantity`,
as the parser builds it, so `parse(format_policy(tree)) == tree` can hold.
The policies carry line numbers, blank lines and comments laid out as a parser
would have recorded them.

`raw_expressions()` gives any expression the grammar can write, valid or not
(`-(a > b) + not c`), for laws that hold for every parsed tree.

`snapshots(keys, thresholds)` gives a snapshot for `CompiledPolicy.evaluate`:
every key with a value that is unknown (None), zero, typical for its metric, or
right at or next to one of the policy's thresholds (`thresholds(policy)`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

from hypothesis import strategies as st

from dsl import ast
from dsl.ast import Binary, Call, Comment, Dim, Expr, LastN, MetricDef, Number, Ref, Rule, Unary
from dsl.builtins import (
    ACTIONS,
    CONTEXT,
    FUNCTIONS,
    MAX_LAST_N,
    METRICS,
    TRACKS,
    UNIT_NAMES,
)
from dsl.units import BYTE_UNITS, parse_quantity

S = st.SearchStrategy

NUMERIC_DIMS = (
    Dim.DURATION,
    Dim.RATIO,
    Dim.RATE,
    Dim.COUNT,
    Dim.CORES,
    Dim.BYTES,
    Dim.NUMBER,
)
COMPARE_OPS = (">", ">=", "<", "<=", "==", "!=")
KEYWORDS = frozenset({"for", "and", "or", "not", "true", "false", "last", "metric", "promql", "as"})

# Metrics a generated policy may define, one per unit, with a realistic query.
CUSTOM_METRICS: dict[str, str] = {
    "queue_depth": "count",
    "gc_pause": "duration",
    "cache_hit_ratio": "ratio",
    "jobs_per_second": "per_second",
    "heap_bytes": "bytes",
    "worker_cores": "cores",
    "saturation_score": "number",
}
TEMPLATES = (
    'sum(rate(http_requests_total{namespace="{{namespace}}", pod=~"{{workload}}-.*"}[{{window}}]))',
    'max(queue_length{namespace="{{namespace}}", deployment="{{workload}}"})',
    'histogram_quantile(0.99, sum by (le) (rate(\n  job_seconds_bucket{namespace="{{namespace}}"}'
    "[{{window}}])))",
)

Custom = tuple[tuple[str, Dim], ...]

_SOMETIMES = st.integers(0, 3).map(lambda n: n == 0)


def number(text: str) -> Number:
    """A literal exactly as the parser builds it from `text`."""
    value, dim, unit = parse_quantity(text)
    return Number(value, dim, text, unit)


# --- literals ----------------------------------------------------------------------


def _texts(*choices: S[str]) -> S[Number]:
    return st.one_of(*choices).map(number)


@functools.cache
def durations() -> S[Number]:
    """Positive durations within the window bound, mostly seconds and minutes.

    Short ones dominate so that `for` and windows matter within the few minutes
    of evaluations a property test runs.
    """
    return _texts(
        st.sampled_from(["300ms", "250ms", "2m", "1m30s", "1.5s", "0.5s", "30s", "1m", "5m"]),
        st.integers(1, 999).map(lambda n: f"{n}ms"),
        st.integers(1, 120).map(lambda n: f"{n}s"),
        st.integers(1, 30).map(lambda n: f"{n}m"),
        st.tuples(st.integers(1, 9), st.integers(1, 59)).map(lambda t: f"{t[0]}m{t[1]}s"),
        st.sampled_from(["1h", "2h30m", "1h0m30s", "24h", "1d", "0.5h"]),
    )


@functools.cache
def percentages() -> S[Number]:
    return _texts(
        st.sampled_from(["1%", "1.5%", "99.9%", "0.1%", "5%", "0%", "100%", "0.05%"]),
        st.integers(0, 100).map(lambda n: f"{n}%"),
    )


@functools.cache
def unit_fractions() -> S[Number]:
    """Plain numbers from 0 to 1, which a ratio may be compared with."""
    return _texts(
        st.sampled_from(["0", "1", "0.01", "0.5", "0.999", ".5", "1e-2", "0.050"]),
        st.integers(0, 1000).map(lambda n: f"0.{n:03d}"),
    )


@functools.cache
def plain_numbers(low: int = 0, high: int = 1000) -> S[Number]:
    texts = ["0", "1", "3", "0.5", "2.5", "10", "50", "100", "1e3", "1.0"]
    return _texts(
        st.sampled_from([t for t in texts if low <= number(t).value <= high]),
        st.integers(low, high).map(str),
    )


@functools.cache
def multipliers() -> S[Number]:
    """Positive plain numbers to scale a value by: `1.5`, `2`, `0.5`."""
    return _texts(st.sampled_from(["1.5", "2", "0.5", "10", "3", "1.25", "100"]))


@functools.cache
def sizes() -> S[Number]:
    return _texts(
        st.sampled_from(["512Mi", "2Gi", "500MB", "1.5Gi", "100Ki", "1GB", "64MiB"]),
        st.tuples(st.integers(1, 4096), st.sampled_from(sorted(BYTE_UNITS))).map(
            lambda t: f"{t[0]}{t[1]}"
        ),
    )


@functools.cache
def windows() -> S[Number | LastN]:
    """A window argument: a positive duration or `last N`."""
    last = st.integers(1, MAX_LAST_N).map(lambda n: LastN(number(str(n))))
    return st.one_of(durations(), last)


@functools.cache
def _same_kind_literal(dim: Dim) -> S[Number] | None:
    """A literal that may be added to, or compared with, a value of `dim` on its own."""
    return {
        Dim.DURATION: durations(),
        Dim.RATIO: percentages(),
        Dim.BYTES: sizes(),
        Dim.NUMBER: plain_numbers(0, 100),
    }.get(dim)


@functools.cache
def thresholds_for(dim: Dim) -> S[Number]:
    """A literal a value of `dim` may be compared with."""
    if dim is Dim.RATIO:
        return st.one_of(percentages(), unit_fractions())
    literal = _same_kind_literal(dim)
    if literal is not None:
        return literal
    return plain_numbers()


# --- references ----------------------------------------------------------------------


@functools.cache
def references(dim: Dim, custom: Custom = ()) -> S[Expr]:
    """Metrics of `dim` (bare, `canary.` or `stable.`) and context values of `dim`."""
    metrics = [n for n, info in METRICS.items() if info.dim is dim]
    metrics += [n for n, d in custom if d is dim]
    context = [n for n, info in CONTEXT.items() if info.dim is dim]
    options: list[S[Expr]] = []
    if metrics:
        options.append(st.builds(Ref, st.sampled_from(metrics), st.sampled_from([None, *TRACKS])))
    if context:
        options.append(st.sampled_from(context).map(Ref))
    return st.one_of(options)


# --- numeric expressions ---------------------------------------------------------------


@functools.cache
def expressions_of(dim: Dim, depth: int = 2, custom: Custom = (), windowed: bool = True) -> S[Expr]:
    """Expressions the checker gives the kind `dim`, nested at most `depth` levels.

    `windowed=False` leaves out avg/min/max/delta/increase/count, as their
    arguments do (a window of windows is not something the language offers).
    """
    if dim is Dim.BOOL:
        return conditions(depth, custom, windowed)
    leaf = references(dim, custom)
    if depth <= 0:
        return leaf
    sub = expressions_of(dim, depth - 1, custom, windowed)
    literal = _same_kind_literal(dim)
    other = sub if literal is None else st.one_of(sub, literal)
    options: list[S[Expr]] = [
        leaf,
        st.builds(Binary, st.sampled_from(["+", "-"]), sub, other),
        st.builds(Binary, st.sampled_from(["*", "/"]), sub, multipliers()),
        st.builds(lambda k, x: Binary("*", k, x), multipliers(), sub),
        st.builds(lambda x: Unary("-", x), sub),
        st.builds(lambda x: Call("abs", (x,)), sub),
    ]
    if windowed:
        inner = expressions_of(dim, depth - 1, custom, False)
        over_window = st.builds(
            lambda f, x, w: Call(f, (x, w)),
            st.sampled_from(["avg", "min", "max", "delta"]),
            inner,
            windows(),
        )
        options += [over_window, over_window]
        if dim is Dim.COUNT:
            options.append(st.builds(lambda x, w: Call("increase", (x, w)), inner, windows()))
    if dim is Dim.NUMBER:
        # x / y of one kind is a plain number (a ratio divided by a ratio stays a ratio).
        for kind in (Dim.DURATION, Dim.COUNT, Dim.RATE, Dim.CORES, Dim.BYTES):
            part = expressions_of(kind, depth - 1, custom, windowed)
            options.append(st.builds(lambda a, b: Binary("/", a, b), part, part))
    return st.one_of(options)


# --- conditions ---------------------------------------------------------------------------


@functools.cache
def comparisons(depth: int = 2, custom: Custom = (), windowed: bool = True) -> S[Expr]:
    """`value OP threshold`, `value OP value` of one kind, `canary.X > stable.X * 1.5`."""

    sides = {
        dim: (
            expressions_of(dim, max(depth - 1, 0), custom, windowed),
            st.one_of(
                thresholds_for(dim), expressions_of(dim, max(depth - 1, 0), custom, windowed)
            ),
        )
        for dim in NUMERIC_DIMS
    }

    @st.composite
    def compare(draw: st.DrawFn) -> Expr:
        left_side, right_side = sides[draw(st.sampled_from(NUMERIC_DIMS))]
        left, right = draw(left_side), draw(right_side)
        if draw(_SOMETIMES):  # the threshold first: `300ms < p99`
            left, right = right, left
        return Binary(draw(st.sampled_from(COMPARE_OPS)), left, right)

    names = sorted(METRICS) + [n for n, _ in custom]
    baseline = st.builds(
        lambda name, op, k: Binary(op, Ref(name, "canary"), Binary("*", Ref(name, "stable"), k)),
        st.sampled_from(names),
        st.sampled_from(COMPARE_OPS),
        multipliers(),
    )
    if not windowed:
        return st.one_of(compare(), baseline)

    # Windowed calls nested in arithmetic are rare draws; write them head-on too.
    @st.composite
    def over_window(draw: st.DrawFn) -> Expr:
        dim = draw(st.sampled_from(NUMERIC_DIMS))
        func = draw(st.sampled_from(["avg", "min", "max", "delta"]))
        value = draw(expressions_of(dim, draw(st.integers(0, 1)), custom, False))
        threshold = draw(thresholds_for(dim))
        return Binary(
            draw(st.sampled_from(COMPARE_OPS)), Call(func, (value, draw(windows()))), threshold
        )

    increase = st.builds(
        lambda track, w, op, n: Binary(op, Call("increase", (Ref("restarts", track), w)), n),
        st.sampled_from([None, *TRACKS]),
        windows(),
        st.sampled_from(COMPARE_OPS),
        plain_numbers(0, 20),
    )
    return st.one_of(compare(), compare(), over_window(), baseline, increase)


@functools.cache
def conditions(depth: int = 3, custom: Custom = (), windowed: bool = True) -> S[Expr]:
    """Boolean expressions: comparisons, absent(x), and/or/not, count(cond, w) OP n."""
    all_refs = st.one_of([references(d, custom) for d in NUMERIC_DIMS])
    compare = comparisons(min(depth, 2), custom, windowed)
    rare = st.one_of(
        st.builds(lambda x: Call("absent", (x,)), all_refs), st.booleans().map(ast.Bool)
    )
    # one_of draws its branches evenly: repeat the common one to make it common
    leaf = st.one_of(compare, compare, compare, compare, rare)
    if depth <= 1:
        return leaf
    sub = conditions(depth - 1, custom, windowed)
    options: list[S[Expr]] = [
        leaf,
        st.builds(Binary, st.sampled_from(["and", "or"]), sub, sub),
        st.builds(lambda x: Unary("not", x), sub),
    ]
    if windowed:
        counted = st.builds(
            lambda c, w: Call("count", (c, w)), conditions(depth - 1, custom, False), windows()
        )
        options.append(
            st.builds(
                lambda c, op, n: Binary(op, c, n),
                counted,
                st.sampled_from(COMPARE_OPS),
                plain_numbers(0, 20),
            )
        )
    return st.one_of(options)


# --- statements and policies ----------------------------------------------------------------

_RESERVED = (
    KEYWORDS
    | set(METRICS)
    | set(CONTEXT)
    | set(FUNCTIONS)
    | set(ACTIONS)
    | set(TRACKS)
    | set(CUSTOM_METRICS)
)


@functools.cache
def rule_names() -> S[str]:
    return st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(
        lambda n: n not in _RESERVED
    )


@functools.cache
def metric_defs() -> S[MetricDef]:
    return st.builds(
        lambda item, template: MetricDef(item[0], template, item[1]),
        st.sampled_from(sorted(CUSTOM_METRICS.items())),
        st.sampled_from(TEMPLATES),
    )


@functools.cache
def rules(custom: Custom = (), depth: int = 3) -> S[Rule]:
    """Rules without a name; `policies` names them."""
    return st.builds(
        lambda cond, for_, action: Rule(None, cond, action, for_),
        conditions(depth, custom),
        st.none() | durations(),
        st.sampled_from(sorted(ACTIONS)),
    )


@functools.cache
def comment_texts() -> S[str]:
    """What follows a `#` as the parser keeps it: one line, no trailing spaces."""
    return st.from_regex(r"#[ -~]{0,30}", fullmatch=True).map(str.rstrip)


@st.composite
def policies(
    draw: st.DrawFn, max_rules: int = 4, depth: int = 3, with_metrics: bool = True
) -> ast.Policy:
    """A policy the checker accepts, with the lines and comments a parser would record."""
    defs: list[MetricDef] = []
    if with_metrics:
        defs = draw(st.lists(metric_defs(), max_size=2, unique_by=lambda d: d.name))
    custom: Custom = tuple((d.name, UNIT_NAMES[d.unit]) for d in defs)
    count = draw(st.integers(1, max_rules))
    names = draw(st.lists(rule_names(), min_size=count, max_size=count, unique=True))
    statements: list[ast.Statement] = list(defs)
    for name in names:
        rule = draw(rules(custom, depth))
        named = draw(st.booleans()) or draw(st.booleans())
        statements.append(replace(rule, name=name) if named else rule)
    return _laid_out(draw, statements)


def _laid_out(draw: st.DrawFn, statements: list[ast.Statement]) -> ast.Policy:
    """Give statements lines, with blank lines and comments between them as drawn."""
    comments: list[Comment] = []
    placed: list[ast.Statement] = []
    line = 1
    sometimes = _SOMETIMES
    for statement in statements:
        line += draw(st.integers(0, 2)) if draw(sometimes) else 0
        for text in draw(st.lists(comment_texts(), max_size=2)) if draw(sometimes) else []:
            comments.append(Comment(text, line, own_line=True))
            line += 1
        placed.append(replace(statement, line=line))
        if isinstance(statement, MetricDef):
            line += statement.template.count("\n")
        if draw(sometimes):
            comments.append(Comment(draw(comment_texts()), line, own_line=False))
        line += 1
    if draw(sometimes):
        comments.append(Comment(draw(comment_texts()), line + draw(st.integers(0, 1)), True))
    return ast.Policy(tuple(placed), tuple(comments))


# --- any tree the grammar can write --------------------------------------------------------


def raw_expressions(max_leaves: int = 12) -> S[Expr]:
    """Expressions of every shape the parser accepts, whether the checker would or not."""
    leaves = st.one_of(
        st.sampled_from(["a", "b", "p99", "weight"]).map(Ref),
        st.builds(Ref, st.sampled_from(["p99", "x"]), st.sampled_from(TRACKS)),
        st.sampled_from(["1", "0.50", "300ms", "1m30s", "1.5%", "2Gi", "1e3"]).map(number),
        st.booleans().map(ast.Bool),
    )
    ops = sorted(ast.ARITHMETIC | ast.COMPARISON | ast.LOGIC)

    def extend(inner: S[Expr]) -> S[Expr]:
        return st.one_of(
            st.builds(Binary, st.sampled_from(ops), inner, inner),
            st.builds(Unary, st.sampled_from(["-", "not"]), inner),
            st.builds(
                lambda f, xs: Call(f, tuple(xs)),
                st.sampled_from(["avg", "f"]),
                st.lists(inner, max_size=2),
            ),
            st.builds(
                lambda x, n: Call("avg", (x, LastN(number(n)))), inner, st.sampled_from(["5", "0"])
            ),
        )

    return st.recursive(leaves, extend, max_leaves=max_leaves)


# --- snapshots ---------------------------------------------------------------------------------


def thresholds(policy: ast.Policy) -> tuple[float, ...]:
    """Every literal value a policy's conditions mention, in base units."""
    found: set[float] = set()

    def walk(node: Expr | LastN) -> None:
        if isinstance(node, Number):
            found.add(node.value)
        for child in ast.children(node):
            walk(child)

    for rule in policy.rules:
        walk(rule.condition)
    return tuple(sorted(found))


_TYPICAL: dict[Dim, S[float]] = {
    Dim.DURATION: st.floats(0, 5),
    Dim.RATIO: st.floats(0, 1),
    Dim.RATE: st.floats(0, 2000),
    Dim.COUNT: st.integers(0, 20).map(float),
    Dim.CORES: st.floats(0, 8),
    Dim.BYTES: st.floats(0, 4 * 2.0**30),
    Dim.NUMBER: st.integers(0, 100).map(float),
}


def _dim_of_key(key: str) -> Dim | None:
    name = key.rpartition(".")[2]
    info = METRICS.get(name) or CONTEXT.get(name)
    if info is not None:
        return info.dim
    unit = CUSTOM_METRICS.get(name)
    return UNIT_NAMES[unit] if unit is not None else None


def _near(values: tuple[float, ...]) -> S[float]:
    """A threshold itself, the floats right beside it, or 10% either side."""
    return st.sampled_from(values).flatmap(
        lambda t: st.sampled_from(
            [t, math.nextafter(t, math.inf), math.nextafter(t, -math.inf), t * 0.9, t * 1.1]
        )
    )


def snapshots(
    metric_keys: frozenset[str] | set[str] | tuple[str, ...], thresholds: tuple[float, ...] = ()
) -> S[dict[str, float | None]]:
    """A value, possibly None (unknown), for every key."""
    near = [_near(thresholds)] if thresholds else []

    def value(key: str) -> S[float | None]:
        dim = _dim_of_key(key)
        typical = (
            _TYPICAL.get(dim, st.floats(-10, 1000)) if dim is not None else st.floats(-10, 1000)
        )
        return st.one_of(st.none(), st.just(0.0), typical, *near, *near)

    return st.fixed_dictionaries({key: value(key) for key in sorted(metric_keys)})
