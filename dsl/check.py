"""The checker: a syntax tree in, a `CheckedPolicy` (or diagnostics) out.

It resolves every name (built-in metrics, metrics the policy defines, context
values, functions, actions, tracks), gives every expression a `Dim`, and
enforces the unit rules of the language: a duration is compared with a
duration, a ratio with a percentage or a plain number from 0 to 1, the weight
with a plain number. Every problem becomes a `Diagnostic` pointing at the
exact span, with a help line that names the closest existing name or the
literal to write instead. The checker reports all problems it can find in one
pass instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dsl import ast
from dsl.ast import Action, Dim, Span
from dsl.builtins import (
    ACTIONS,
    CONTEXT,
    DEFAULT_TRACK,
    FUNCTIONS,
    MAX_LAST_N,
    MAX_WINDOW_SECONDS,
    METRICS,
    TRACKS,
    UNIT_NAMES,
)
from dsl.diagnostics import Diagnostic
from dsl.units import closest, format_duration, format_value


@dataclass(frozen=True, slots=True)
class CheckedRule:
    node: ast.Rule
    label: str
    action: Action
    for_seconds: float


@dataclass(frozen=True, slots=True)
class CheckedPolicy:
    """A policy whose every name resolves and whose units agree.

    `types` maps each expression node to its kind. Nodes compare by value, and
    the kind of an expression depends only on its text, so equal nodes share
    an entry.
    """

    policy: ast.Policy
    rules: tuple[CheckedRule, ...]
    metric_dims: Mapping[str, Dim]
    definitions: tuple[ast.MetricDef, ...]
    types: Mapping[ast.Expr, Dim] = field(repr=False)
    metric_keys: frozenset[str]
    context_keys: frozenset[str]


def key_of(ref: ast.Ref) -> str:
    """The snapshot key a reference reads: `weight`, or `canary.p99` for a bare `p99`."""
    if ref.track is None and ref.name in CONTEXT:
        return ref.name
    return f"{ref.track or DEFAULT_TRACK}.{ref.name}"


# Names people reach for from other languages (PromQL, SQL, spreadsheets).
_SYNONYMS = {
    "mean": "avg",
    "average": "avg",
    "minimum": "min",
    "maximum": "max",
    "rate": "increase",
    "sum": "increase",
    "deriv": "delta",
    "absent_over_time": "absent",
    "count_over_time": "count",
    "avg_over_time": "avg",
    "max_over_time": "max",
    "min_over_time": "min",
}

MIN_SECONDS = 0.001  # the smallest unit a duration is written in: 1ms

_PLAIN = {Dim.NUMBER, Dim.COUNT, Dim.RATE, Dim.CORES}
_EXAMPLE = {
    Dim.DURATION: "a duration such as 300ms",
    Dim.RATIO: "a percentage such as 1%",
    Dim.BYTES: "a size such as 512Mi",
    Dim.NUMBER: "a plain number such as 3",
    Dim.COUNT: "a plain number such as 3",
    Dim.RATE: "a plain number of requests per second such as 50",
    Dim.CORES: "a plain number of cores such as 0.5",
    Dim.BOOL: "a condition such as `p99 > 300ms`",
}


def check(policy: ast.Policy) -> tuple[CheckedPolicy | None, list[Diagnostic]]:
    """Check a parsed policy; the result is None when any error was found."""
    return _Checker(policy).run()


class _Checker:
    def __init__(self, policy: ast.Policy) -> None:
        self.policy = policy
        self.diagnostics: list[Diagnostic] = []
        self.types: dict[ast.Expr, Dim] = {}
        self.metric_keys: set[str] = set()
        self.context_keys: set[str] = set()
        self.dims: dict[str, Dim] = {name: info.dim for name, info in METRICS.items()}

    def error(
        self, code: str, message: str, span: Span, label: str | None = None, help: str | None = None
    ) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, label, help))

    def run(self) -> tuple[CheckedPolicy | None, list[Diagnostic]]:
        definitions = self._definitions()
        rules: list[CheckedRule] = []
        first_line: dict[str, int] = {}
        for rule in self.policy.rules:
            checked = self._rule(rule)
            if rule.name is not None:
                if rule.name in first_line:
                    self.error(
                        "E301",
                        f"the rule name `{rule.name}` is used twice",
                        rule.name_span,
                        help=f"it is first used on line {first_line[rule.name]}; "
                        "give each rule its own name",
                    )
                else:
                    first_line[rule.name] = rule.line
            if checked is not None:
                rules.append(checked)
        self.diagnostics.sort(key=lambda d: d.span.start)
        if self.diagnostics:
            return None, self.diagnostics
        return (
            CheckedPolicy(
                policy=self.policy,
                rules=tuple(rules),
                metric_dims=dict(self.dims),
                definitions=definitions,
                types=self.types,
                metric_keys=frozenset(self.metric_keys),
                context_keys=frozenset(self.context_keys),
            ),
            [],
        )

    # --- statements -------------------------------------------------------------

    def _definitions(self) -> tuple[ast.MetricDef, ...]:
        if not self.policy.metrics:
            return ()
        from dsl.promql import check_template

        seen: dict[str, int] = {}
        for d in self.policy.metrics:
            self.diagnostics.extend(check_template(d))
            if d.name in METRICS or d.name in CONTEXT or d.name in FUNCTIONS:
                self.error(
                    "E404",
                    f"`{d.name}` is a built-in name and cannot be redefined",
                    d.name_span,
                    help="choose another name, such as "
                    f"`{d.name}_custom`; to change how a built-in metric is queried, "
                    "override the metric catalog",
                )
            elif d.name in seen:
                self.error(
                    "E404",
                    f"the metric `{d.name}` is defined twice",
                    d.name_span,
                    help=f"it is first defined on line {seen[d.name]}",
                )
            else:
                seen[d.name] = d.line
                if d.unit in UNIT_NAMES:
                    self.dims[d.name] = UNIT_NAMES[d.unit]
        return self.policy.metrics

    def _rule(self, rule: ast.Rule) -> CheckedRule | None:
        dim = self.expr(rule.condition)
        ok = dim is not None
        if dim is not None and dim is not Dim.BOOL:
            self.error(
                "E205",
                f"the condition of a rule must be true or false, but this is a {_describe(dim)}",
                rule.condition.span,
                help="compare it with a threshold, such as `p99 > 300ms`",
            )
            ok = False
        action = ACTIONS.get(rule.action)
        if action is None:
            guess = closest(rule.action, list(ACTIONS))
            self.error(
                "E103",
                f"unknown action `{rule.action}`",
                rule.action_span,
                help=f"did you mean `{guess}`?" if guess else "the actions are "
                "rollback, pause, promote and continue",
            )
            ok = False
        for_seconds = 0.0
        if rule.for_ is not None:
            f = rule.for_
            if f.dim is not Dim.DURATION or f.value < MIN_SECONDS:
                self.error(
                    "E302",
                    f"`for` needs a positive duration, not `{f.text}`",
                    f.span,
                    help=_duration_help(f),
                )
                ok = False
            else:
                for_seconds = f.value
        if not ok or action is None:
            return None
        return CheckedRule(rule, rule.label, action, for_seconds)

    # --- expressions ------------------------------------------------------------

    def expr(self, node: ast.Expr | ast.LastN) -> Dim | None:
        """The kind of an expression, or None after reporting why it has none."""
        if isinstance(node, ast.LastN):
            self.error(
                "E207",
                "`last N` can only be the window of avg, min, max, delta, increase or count",
                node.span,
            )
            return None
        dim = self._expr(node)
        if dim is not None:
            self.types[node] = dim
        return dim

    def _expr(self, node: ast.Expr) -> Dim | None:
        if isinstance(node, ast.Number):
            return node.dim
        if isinstance(node, ast.Bool):
            return Dim.BOOL
        if isinstance(node, ast.Ref):
            return self._ref(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Unary):
            return self._unary(node)
        if node.op in ast.LOGIC:
            return self._logic(node)
        if node.op in ast.COMPARISON:
            return self._compare(node)
        return self._arithmetic(node)

    def _ref(self, ref: ast.Ref) -> Dim | None:
        name_span = Span(ref.span.end - len(ref.name), ref.span.end)
        if ref.track is not None and ref.track not in TRACKS:
            guess = closest(ref.track, TRACKS)
            self.error(
                "E104",
                f"unknown track `{ref.track}`",
                Span(ref.span.start, ref.span.start + len(ref.track)),
                help=f"did you mean `{guess}`?" if guess else "the tracks are canary and stable",
            )
            return self.dims.get(ref.name)
        if ref.name in CONTEXT:
            if ref.track is not None:
                self.error(
                    "E105",
                    f"`{ref.name}` is a value of the rollout, not a metric of a track",
                    ref.span,
                    help=f"write `{ref.name}`",
                )
                return None
            self.context_keys.add(ref.name)
            return CONTEXT[ref.name].dim
        if ref.name in self.dims:
            self.metric_keys.add(key_of(ref))
            return self.dims[ref.name]
        candidates = list(self.dims) + (list(CONTEXT) if ref.track is None else [])
        guess = closest(ref.name, candidates)
        if ref.name in FUNCTIONS:
            help = f"`{ref.name}` is a function: {FUNCTIONS[ref.name].signature}"
        elif guess:
            help = f"did you mean `{guess}`?"
        else:
            help = "define it with `metric NAME = promql `...` as UNIT`, or use one of " + (
                ", ".join(sorted(self.dims))
            )
        self.error("E101", f"unknown metric `{ref.name}`", name_span, help=help)
        return None

    def _call(self, call: ast.Call) -> Dim | None:
        info = FUNCTIONS.get(call.func)
        if info is None:
            guess = _SYNONYMS.get(call.func.lower()) or closest(call.func, list(FUNCTIONS))
            if call.func in self.dims or call.func in CONTEXT:
                help = f"`{call.func}` is a metric, not a function"
            elif guess:
                help = f"did you mean `{guess}`?"
            else:
                help = "the functions are " + ", ".join(FUNCTIONS)
            self.error("E102", f"unknown function `{call.func}`", call.func_span, help=help)
            for arg in call.args:
                if not isinstance(arg, ast.LastN):
                    self.expr(arg)
            return None
        if len(call.args) != info.arity:
            self.error(
                "E206",
                f"`{call.func}` takes {info.arity} argument{'s' * (info.arity > 1)}, "
                f"not {len(call.args)}",
                call.span,
                help=f"write {info.signature}",
            )
            return None
        value = call.args[0]
        dim = self.expr(value)
        if info.windowed:
            self._window(call, call.args[1])
        if dim is None:
            return None
        if info.takes_condition:
            if dim is not Dim.BOOL:
                self.error(
                    "E207",
                    f"`{call.func}` counts where a condition holds, but this is a "
                    f"{_describe(dim)}",
                    value.span,
                    help=f"write a condition, such as {call.func}(p99 > 250ms, 10m)",
                )
                return None
            return Dim.COUNT
        if dim is Dim.BOOL:
            self.error(
                "E207",
                f"`{call.func}` needs a number, but this is a condition",
                value.span,
                help=f"write {info.signature}"
                + (", or count(condition, window) to count" if info.windowed else ""),
            )
            return None
        return Dim.BOOL if call.func == "absent" else dim

    def _window(self, call: ast.Call, arg: ast.Expr | ast.LastN) -> None:
        if isinstance(arg, ast.LastN):
            n = arg.count
            if n.dim is not Dim.NUMBER or n.value != int(n.value) or n.value < 1:
                self.error(
                    "E303",
                    f"`last` needs a whole number of evaluations, not `{n.text}`",
                    n.span,
                    help="write a count such as `last 5`",
                )
            elif n.value > MAX_LAST_N:
                self.error(
                    "E304",
                    f"the window `last {n.text}` is larger than {MAX_LAST_N} evaluations",
                    arg.span,
                    help=f"windows are kept in memory; use at most `last {MAX_LAST_N}`",
                )
            return
        if isinstance(arg, ast.Number) and arg.dim is Dim.DURATION and arg.value >= MIN_SECONDS:
            if arg.value > MAX_WINDOW_SECONDS:
                self.error(
                    "E304",
                    f"the window `{arg.text}` is longer than "
                    f"{format_duration(MAX_WINDOW_SECONDS)}",
                    arg.span,
                    help="windows are kept in memory; use at most "
                    f"{format_duration(MAX_WINDOW_SECONDS)}",
                )
            return
        help = "write a duration such as 5m, or `last N` for the last N evaluations"
        if isinstance(arg, ast.Number):
            help = _duration_help(arg)
        self.error(
            "E303",
            f"the window of `{call.func}` must be a positive duration or `last N`",
            arg.span,
            help=help,
        )

    def _unary(self, node: ast.Unary) -> Dim | None:
        dim = self.expr(node.operand)
        if dim is None:
            return None
        if node.op == "not":
            if dim is not Dim.BOOL:
                self.error(
                    "E205",
                    f"`not` needs a condition, but this is a {_describe(dim)}",
                    node.operand.span,
                    help="compare it first, such as `not (p99 > 300ms)`",
                )
                return None
            return Dim.BOOL
        if dim is Dim.BOOL:
            self.error("E205", "a condition cannot be negated with `-`", node.span,
                       help="write `not` to negate a condition")
            return None
        return dim

    def _logic(self, node: ast.Binary) -> Dim | None:
        left, right = self.expr(node.left), self.expr(node.right)
        ok = True
        for side, dim in ((node.left, left), (node.right, right)):
            if dim is not None and dim is not Dim.BOOL:
                self.error(
                    "E205",
                    f"`{node.op}` joins conditions, but this is a {_describe(dim, side)}",
                    side.span,
                    help="compare it with a threshold, such as `p99 > 300ms`",
                )
                ok = False
        return Dim.BOOL if ok and left is not None and right is not None else None

    def _compare(self, node: ast.Binary) -> Dim | None:
        left, right = self.expr(node.left), self.expr(node.right)
        if left is None or right is None:
            return None
        if left is Dim.BOOL or right is Dim.BOOL:
            if left is right and node.op in ("==", "!="):
                return Dim.BOOL
            bad = node.left if left is Dim.BOOL else node.right
            self.error(
                "E205",
                f"`{node.op}` compares numbers, but this is a condition",
                bad.span,
                help="join conditions with `and` or `or`",
            )
            return None
        if _comparable(node.left, left, node.right, right, self, node):
            return Dim.BOOL
        return None

    def _arithmetic(self, node: ast.Binary) -> Dim | None:
        left, right = self.expr(node.left), self.expr(node.right)
        if left is None or right is None:
            return None
        for side, dim in ((node.left, left), (node.right, right)):
            if dim is Dim.BOOL:
                self.error(
                    "E205",
                    f"`{node.op}` needs numbers, but this is a condition",
                    side.span,
                )
                return None
        result = _combine(node.op, left, node.left, right, node.right)
        if result is None:
            verb = {"+": "added to", "-": "subtracted from", "*": "multiplied by",
                    "/": "divided by"}[node.op]
            # "a X cannot be added to a Y" reads right to left; "multiplied by" left to right
            first, second = (
                (_describe(right, node.right), _describe(left, node.left))
                if node.op in "+-"
                else (_describe(left, node.left), _describe(right, node.right))
            )
            self.error(
                "E202",
                f"a {first} cannot be {verb} a {second}",
                node.op_span,
                help=_combine_help(node.op, left, right),
            )
        return result


# --- unit rules ----------------------------------------------------------------


def _literal(node: ast.Expr) -> float | None:
    """The value of a literal number (`3`, `-3`), None for anything else."""
    if isinstance(node, ast.Number):
        return node.value
    if isinstance(node, ast.Unary) and node.op == "-" and isinstance(node.operand, ast.Number):
        return -node.operand.value
    return None


def _is_plain_literal(node: ast.Expr) -> bool:
    inner = node.operand if isinstance(node, ast.Unary) and node.op == "-" else node
    return isinstance(inner, ast.Number) and inner.dim is Dim.NUMBER


def _is_percent_literal(node: ast.Expr) -> bool:
    inner = node.operand if isinstance(node, ast.Unary) and node.op == "-" else node
    return isinstance(inner, ast.Number) and inner.unit == "%"


def _comparable(
    ln: ast.Expr, ld: Dim, rn: ast.Expr, rd: Dim, checker: _Checker, node: ast.Binary
) -> bool:
    if ld is rd:
        return True
    if {ld, rd} <= _PLAIN and Dim.NUMBER in (ld, rd):
        return True
    for a, ad, b, bd in ((ln, ld, rn, rd), (rn, rd, ln, ld)):
        # a ratio against a plain number: only a literal from 0 to 1 reads unambiguously
        if ad is Dim.RATIO and bd is Dim.NUMBER:
            value = _literal(b)
            if value is None and not _reads_context(b):
                return True  # a computed dimensionless number, such as x / y
            if value is not None and 0 <= value <= 1:
                return True
            if _is_weight(b) and _is_percent_literal(a):
                checker.error(
                    "E204",
                    "the weight is a number from 0 to 100, not a percentage",
                    a.span,
                    help=f"write `{_short_pct(_literal(a) or 0.0)}`",
                )
                return False
            if value is not None:
                scaled = isinstance(a, ast.Binary) and a.op in ("*", "/")
                checker.error(
                    "E203",
                    f"a ratio is between 0 and 1, so `{_text(b)}` is out of range for a "
                    f"{_describe(ad, a)}",
                    b.span,
                    help="compare the ratio itself with a percentage, such as "
                    "`error_rate > 5%`, instead of scaling it"
                    if scaled
                    else f"write a percentage such as {format_value(value, Dim.NUMBER)}%",
                )
                return False
        # durations and sizes need their unit, except for a plain zero
        if ad in (Dim.DURATION, Dim.BYTES) and bd is Dim.NUMBER and _literal(b) == 0:
            return True
    literal_side = rn if _is_plain_literal(rn) or isinstance(rn, ast.Number) else ln
    other_side, other_dim = (ln, ld) if literal_side is rn else (rn, rd)
    bad_dim = rd if literal_side is rn else ld
    has_literal = _literal(ln) is not None or _literal(rn) is not None
    checker.error(
        "E201",
        f"a {_describe(bad_dim, literal_side)} cannot be compared with a "
        f"{_describe(other_dim, other_side)}",
        literal_side.span,
        help=_compare_help(other_dim, literal_side)
        if has_literal
        else "these measure different things; compare each with a threshold of its own unit",
    )
    return False


def _compare_help(expected: Dim, literal: ast.Expr) -> str:
    if expected is Dim.CORES and isinstance(literal, ast.Number) and literal.unit == "m":
        return "cpu is in cores and `m` means minutes: write 0.5 for 500 millicores"
    if expected is Dim.NUMBER and _is_percent_literal(literal):
        return f"write the plain number {_short_pct(_literal(literal) or 0.0)}"
    if expected is Dim.DURATION and _is_plain_literal(literal):
        return f"write a duration such as {_text(literal)}s or {_text(literal)}ms"
    return f"write {_EXAMPLE[expected]}"


def _short_pct(ratio: float) -> str:
    return format_value(ratio * 100, Dim.NUMBER)


def _reads_context(node: ast.Expr) -> bool:
    return isinstance(node, ast.Ref) and node.track is None and node.name in CONTEXT


def _is_weight(node: ast.Expr) -> bool:
    return isinstance(node, ast.Ref) and node.track is None and node.name == "weight"


def _combine(op: str, ld: Dim, ln: ast.Expr, rd: Dim, rn: ast.Expr) -> Dim | None:
    if op in "+-":
        if ld is rd:
            return ld
        if Dim.NUMBER in (ld, rd):
            other = rd if ld is Dim.NUMBER else ld
            number_node = ln if ld is Dim.NUMBER else rn
            if other in _PLAIN or other is Dim.RATIO or _literal(number_node) == 0:
                return other
        return None
    if op == "*":
        if ld is Dim.NUMBER:
            return rd
        if rd is Dim.NUMBER:
            return ld
        if ld is Dim.RATIO:
            return rd
        if rd is Dim.RATIO:
            return ld
        if {ld, rd} == {Dim.RATE, Dim.DURATION}:
            return Dim.COUNT
        return None
    # division
    if ld is rd:
        return Dim.NUMBER  # like over like, ratio over ratio included: a plain factor
    if rd in (Dim.NUMBER, Dim.RATIO):
        return ld
    if ld is Dim.COUNT and rd is Dim.DURATION:
        return Dim.RATE
    return None


def _combine_help(op: str, ld: Dim, rd: Dim) -> str:
    if op in "+-":
        return f"both sides of `{op}` must be of one kind; write {_EXAMPLE[ld]}"
    if op == "*":
        return "multiply by a plain number, such as `stable.p99 * 1.5`"
    return "divide by a plain number, or by a value of the same kind to get a ratio"


def _text(node: ast.Expr) -> str:
    if isinstance(node, ast.Number):
        return node.text
    if isinstance(node, ast.Unary) and isinstance(node.operand, ast.Number):
        return "-" + node.operand.text
    return "this value"


def _describe(dim: Dim, node: ast.Expr | None = None) -> str:
    """`duration (p99)`, `percentage`, `plain number`: how messages name a value."""
    if isinstance(node, ast.Number) or (
        isinstance(node, ast.Unary) and isinstance(node.operand, ast.Number)
    ):
        if _is_percent_literal(node):
            return "percentage"
        if dim is Dim.NUMBER:
            return "plain number"
    kind = {
        Dim.NUMBER: "number",
        Dim.COUNT: "count",
        Dim.DURATION: "duration",
        Dim.RATIO: "ratio",
        Dim.BYTES: "size in bytes",
        Dim.RATE: "rate per second",
        Dim.CORES: "number of cores",
        Dim.BOOL: "condition",
    }[dim]
    if isinstance(node, ast.Ref):
        return f"{kind} ({node.text})"
    return kind


def _duration_help(n: ast.Number) -> str:
    if n.dim is Dim.NUMBER and n.value > 0:
        return f"write it with a unit, such as {n.text}s or {n.text}m"
    if n.dim is Dim.DURATION and 0 < n.value < MIN_SECONDS:
        return "durations are at least 1ms"
    return "write a positive duration such as 30s, 2m or 1h"
