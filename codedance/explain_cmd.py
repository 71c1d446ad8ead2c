"""`codedance explain FILE...`: a policy in, each of its rules in plain words out.

    $ codedance explain checkout.rules
    latency: roll back when the canary's p99 latency has been above 300 ms (0.3 s) for 2 minutes

The words come from the checked syntax tree, never from the text: each
comparison reads by its operator ("is above", "is at least"), `and`, `or`
and `not` keep their grouping, functions say what they compute ("the average
of ... over the last 5 minutes"), a metric names its track ("the canary's",
"the stable's"), and every literal shows the unit it is written in and its
value in base units (`300ms` is "300 ms (0.3 s)", `1%` is "1% (0.01)"), as
the evaluator compares them. After the rules come the metrics the policy
reads, each with its unit, and the metrics it defines with their queries.

Exit 0; 1 with the diagnostics of a policy that has errors; 2 for a file
that cannot be read or a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dsl
from codedance.policy_files import FileProblem, UsageError, read_text
from dsl import ast
from dsl.ast import Action, Dim
from dsl.builtins import CONTEXT, DEFAULT_TRACK
from dsl.compile import CompiledPolicy, CompiledRule
from dsl.units import format_value


def add_command(commands: Any) -> None:
    p = commands.add_parser("explain", help="say what each rule of a policy does, in words")
    p.add_argument("paths", nargs="+", metavar="FILE", help="a .rules file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    failed = False
    for i, path in enumerate(args.paths):
        try:
            source = read_text(path)
        except FileProblem as e:
            raise UsageError(str(e)) from None
        try:
            policy = dsl.load(source, path)
        except dsl.PolicyError as e:
            print(e.render(), file=sys.stderr)
            failed = True
            continue
        if i:
            print()
        print(explain_policy(policy))
    return 1 if failed else 0


def explain_policy(policy: CompiledPolicy) -> str:
    """The whole explanation of one policy, as printed."""
    n = len(policy.rules)
    lines = [f"{policy.path}: {n} rule{'' if n == 1 else 's'}", ""]
    lines += [explain_rule(policy, r) for r in policy.rules]
    if n > 1:
        lines += [
            "",
            "When several rules fire at once, rollback beats pause, pause beats promote, and "
            "promote beats continue; between rules of the same action, the one written first "
            "decides.",
        ]
    reads = sorted(policy.metric_keys)
    if reads:
        lines += ["", "Metrics it reads:"]
        lines += [f"  {key}: {_metric_meaning(policy, key)}" for key in reads]
    if policy.context_keys:
        lines += ["", "Context values it reads:"]
        lines += [
            f"  {name}: {CONTEXT[name].meaning}, {_UNIT[CONTEXT[name].dim]}"
            for name in sorted(policy.context_keys)
        ]
    if policy.checked.definitions:
        lines += ["", "Metrics it defines:"]
        for d in policy.checked.definitions:
            dim = policy.checked.metric_dims.get(d.name, Dim.NUMBER)
            lines.append(
                f"  {d.name}: the PromQL query `{d.template}` (its placeholders filled in for "
                f"each track), read as {_UNIT[dim]} (`as {d.unit}`)"
            )
    return "\n".join(lines)


def _metric_meaning(policy: CompiledPolicy, key: str) -> str:
    track, name = key.split(".", 1)
    dim = policy.checked.metric_dims.get(name, Dim.NUMBER)
    if name in _MEANINGS and name not in {d.name for d in policy.checked.definitions}:
        return f"the {track}'s {_MEANINGS[name]}, {_UNIT[dim]}"
    return f"the {track}'s `{name}`, defined by this policy (below), {_UNIT[dim]}"


_UNIT = {
    Dim.DURATION: "a duration in seconds",
    Dim.RATIO: "a ratio from 0 to 1 (1% is 0.01)",
    Dim.RATE: "a rate per second",
    Dim.COUNT: "a count",
    Dim.BYTES: "a size in bytes",
    Dim.CORES: "a number of CPU cores",
    Dim.NUMBER: "a plain number",
    Dim.BOOL: "true or false",
}

# ---------------------------------------------------------------- rules

_VERBS = {
    Action.ROLLBACK: "roll back",
    Action.PAUSE: "pause",
    Action.PROMOTE: "promote",
    Action.CONTINUE: "continue",
}
_IS = {">": "is above", ">=": "is at least", "<": "is below", "<=": "is at most",
       "==": "is equal to", "!=": "is not equal to"}
_HAS_BEEN = {">": "has been above", ">=": "has been at least", "<": "has been below",
             "<=": "has been at most", "==": "has been equal to", "!=": "has been different from"}
_IS_NOT = {">": "is not above", ">=": "is not at least", "<": "is not below",
           "<=": "is not at most", "==": "is not equal to", "!=": "is equal to"}
_MIRROR = {">": "<", ">=": "<=", "<": ">", "<=": ">=", "==": "==", "!=": "!="}


def explain_rule(policy: CompiledPolicy, rule: CompiledRule) -> str:
    """One rule in words, e.g. `latency: roll back when the canary's p99 latency has been
    above 300 ms (0.3 s) for 2 minutes`."""
    words = _Words(policy)
    cond = rule.node.condition
    verb = _VERBS[rule.action]
    if not rule.for_seconds:
        return f"{rule.label}: {verb} when {words.condition(cond)}"
    held = spoken_duration(rule.for_seconds)
    if isinstance(cond, ast.Binary) and cond.op in ast.COMPARISON:
        return f"{rule.label}: {verb} when {words.comparison(cond, _HAS_BEEN)} for {held}"
    if isinstance(cond, ast.Call) and cond.func == "absent":
        return f"{rule.label}: {verb} when {words.absent(cond, 'has had')} for {held}"
    return f"{rule.label}: {verb} once this has held for {held}: {words.condition(cond)}"


class _Words:
    """Expressions of one policy in words; the policy's types give each literal its unit."""

    def __init__(self, policy: CompiledPolicy) -> None:
        self.types = policy.checked.types

    def condition(self, node: ast.Expr) -> str:
        if isinstance(node, ast.Binary) and node.op in ast.LOGIC:
            return f" {node.op} ".join(
                self._grouped(side, node.op) for side in (node.left, node.right)
            )
        if isinstance(node, ast.Binary) and node.op in ast.COMPARISON:
            return self.comparison(node, _IS)
        if isinstance(node, ast.Unary) and node.op == "not":
            inner = node.operand
            if isinstance(inner, ast.Binary) and inner.op in ast.COMPARISON:
                return self.comparison(inner, _IS_NOT)
            if isinstance(inner, ast.Call) and inner.func == "absent":
                arg = inner.args[0]
                assert not isinstance(arg, ast.LastN)
                return f"{self.value(arg)} has a value"
            return f"it is not the case that ({self.condition(inner)})"
        if isinstance(node, ast.Call) and node.func == "absent":
            return self.absent(node, "has")
        if isinstance(node, ast.Bool):
            return "always (true)" if node.value else "never (false)"
        return self.value(node)

    def _grouped(self, node: ast.Expr, parent: str) -> str:
        text = self.condition(node)
        if isinstance(node, ast.Binary) and node.op in ast.LOGIC and node.op != parent:
            return f"({text})"
        return text

    def absent(self, call: ast.Call, verb: str) -> str:
        """`absent(p99)`: "the canary's p99 latency has no value" (`verb` "has" or "has had")."""
        arg = call.args[0]
        assert not isinstance(arg, ast.LastN)
        return f"{self.value(arg)} {verb} no value"

    def comparison(self, node: ast.Binary, phrases: dict[str, str]) -> str:
        left, right, op = node.left, node.right, node.op
        # Say the metric first: `300ms < p99` reads as "p99 is above 300 ms".
        if isinstance(left, ast.Number) and not isinstance(right, ast.Number):
            left, right, op = right, left, _MIRROR[op]
        return f"{self._side(left, right)} {phrases[op]} {self._side(right, left)}"

    def _side(self, node: ast.Expr, other: ast.Expr) -> str:
        if isinstance(node, ast.Number):
            return literal(node, self.types.get(other, Dim.NUMBER), other)
        return self.value(node)

    def value(self, node: ast.Expr) -> str:
        if isinstance(node, ast.Number):
            return literal(node, node.dim, None)
        if isinstance(node, ast.Bool):
            return "true" if node.value else "false"
        if isinstance(node, ast.Ref):
            return reference(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Unary):
            if node.op == "not":
                return self.condition(node)
            return f"minus {self._operand(node.operand)}"
        if node.op in ast.COMPARISON or node.op in ast.LOGIC:
            return self.condition(node)
        return self._arithmetic(node)

    def _arithmetic(self, node: ast.Binary) -> str:
        left, right = self._operand(node.left), self._operand(node.right)
        if node.op == "*":
            # `stable.p99 * 1.5` reads as "1.5 times the stable's p99 latency"
            if isinstance(node.right, ast.Number) and not isinstance(node.left, ast.Number):
                return f"{right} times {left}"
            return f"{left} times {right}"
        word = {"/": "divided by", "+": "plus", "-": "minus"}[node.op]
        return f"{left} {word} {right}"

    def _operand(self, node: ast.Expr) -> str:
        text = self.value(node)
        if isinstance(node, ast.Binary) and node.op in ast.ARITHMETIC:
            return f"({text})"
        return text

    def _call(self, node: ast.Call) -> str:
        func = node.func
        first = node.args[0]
        assert not isinstance(first, ast.LastN)
        if func == "abs":
            return f"the absolute value of {self._operand(first)}"
        if func == "absent":
            return f"whether {self.value(first)} has no value"
        window = node.args[1]
        if func == "count":
            where = self.condition(first)
            if isinstance(window, ast.LastN):
                n = int(window.count.value)
                return f"the number of the last {n} evaluations where {where}"
            return f"the number of evaluations in {_window(window)} where {where}"
        x = self.value(first)
        over = f"over {_window(window)}"
        return {
            "avg": f"the average of {x} {over}",
            "min": f"the lowest value of {x} {over}",
            "max": f"the highest value of {x} {over}",
            "delta": f"the change in {x} {over} (newest minus oldest value)",
            "increase": f"the increase in {x} {over} (a counter going back to 0 counts as a "
            "restart)",
        }[func]


def _window(window: ast.Expr | ast.LastN) -> str:
    if isinstance(window, ast.LastN):
        n = int(window.count.value)
        return "the last evaluation" if n == 1 else f"the last {n} evaluations"
    assert isinstance(window, ast.Number)
    spoken = spoken_duration(window.value)
    # "the last minute", not "the last 1 minute"; "the last 1 minute 30 seconds" stays
    if spoken.startswith("1 ") and " " not in spoken[2:]:
        spoken = spoken[2:]
    return f"the last {spoken}"


_METRIC_WORDS = {
    "p50": "median (p50) latency",
    "p90": "p90 latency",
    "p99": "p99 latency",
    "success_rate": "success rate",
    "error_rate": "error rate",
    "request_rate": "request rate",
    "ready_pods": "number of ready pods",
    "not_ready_pods": "number of pods that are not ready",
    "failed_pods": "number of failed pods",
    "restarts": "restart count",
    "cpu": "CPU use",
    "memory": "memory use",
}
# What each built-in metric measures, for the list of metrics a policy reads.
_MEANINGS = {
    "p50": "median request latency",
    "p90": "90th percentile request latency",
    "p99": "99th percentile request latency",
    "success_rate": "share of responses that are 2xx",
    "error_rate": "share of responses that are 5xx",
    "request_rate": "requests served",
    "ready_pods": "pods that are ready",
    "not_ready_pods": "pods that are not ready",
    "failed_pods": "pods in phase Failed",
    "restarts": "container restarts so far, a counter (read it with increase)",
    "cpu": "CPU usage",
    "memory": "working-set memory",
}
_CONTEXT_WORDS = {
    "weight": "the canary weight",
    "step": "the step number (from 0)",
    "elapsed": "the time since the rollout started",
    "step_elapsed": "the time since the current step started",
}


def reference(ref: ast.Ref) -> str:
    """`p99` -> "the canary's p99 latency"; `weight` -> "the canary weight"."""
    if ref.track is None and ref.name in CONTEXT:
        return _CONTEXT_WORDS[ref.name]
    track = ref.track or DEFAULT_TRACK
    return f"the {track}'s {_METRIC_WORDS.get(ref.name, ref.name)}"


_BYTE_NAMES = {"Ki": "KiB", "Mi": "MiB", "Gi": "GiB", "Ti": "TiB", "kB": "kB", "KB": "kB"}
_DURATION_NAMES = {"ms": "ms", "s": "s", "m": "min", "h": "h", "d": "d"}


def literal(node: ast.Number, dim: Dim, other: ast.Expr | None) -> str:
    """A literal with its unit as written and its value in base units.

    `dim` is the kind of what it is compared with: a plain `0.01` compared
    with a ratio is "0.01 (1%)", a plain `2` compared with a request rate is
    "2 per second".
    """
    base = _plain(node.value)
    if node.dim is Dim.DURATION:
        unit = _DURATION_NAMES.get(node.unit)
        written = f"{node.text[: -len(node.unit)]} {unit}" if unit else node.text
        return written if node.unit == "s" else f"{written} ({base} s)"
    if node.dim is Dim.RATIO:
        return f"{node.text} ({base})"
    if node.dim is Dim.BYTES:
        if node.unit == "B":
            return f"{node.text[:-1]} bytes"
        unit = _BYTE_NAMES.get(node.unit, node.unit)
        return f"{node.text[: -len(node.unit)]} {unit} ({base} bytes)"
    if dim is Dim.RATIO:
        return f"{node.text} ({format_value(node.value, Dim.RATIO)})"
    if dim is Dim.RATE:
        return f"{node.text} per second"
    if dim is Dim.CORES:
        return f"{node.text} core{'' if node.value == 1 else 's'}"
    if isinstance(other, ast.Ref) and other.track is None and other.name == "weight":
        return f"{node.text} (of 100)"
    return node.text


def _plain(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def spoken_duration(seconds: float) -> str:
    """`120` -> "2 minutes", `90` -> "1 minute 30 seconds", `0.25` -> "250 milliseconds"."""
    parts: list[str] = []
    rest = seconds
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if rest >= size:
            n = int(rest // size)
            parts.append(_count(n, name))
            rest -= n * size
    if rest > 1e-9 or not parts:
        if rest < 1 and not parts:
            parts.append(_count(rest * 1000, "millisecond"))
        else:
            parts.append(_count(rest, "second"))
    return " ".join(parts)


def _count(n: float, word: str) -> str:
    text = format_value(n, Dim.NUMBER)
    return f"{text} {word}{'' if text == '1' else 's'}"
