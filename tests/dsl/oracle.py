"""A reference interpreter of LANGUAGE.md sections 3-5: the oracle for the compiler.

In: a parsed `dsl.ast.Policy` (from `dsl.parser.parse`) and, tick by tick, the
time and a snapshot (`"canary.p99"`, `"stable.error_rate"`, `"weight"`, ... ->
a float, or None / a missing key for unknown). Out: an `OracleVerdict` per
tick: the action and deciding rule, the health score, every rule's condition
and `pending_since`.

It is written straight from the language reference and deliberately shares no
code with `dsl.compile` or `dsl.runtime`: it walks the syntax tree by plain
recursion at every tick and keeps every window's whole history in a plain
list. Slow and obvious is the point; the property tests check that the
compiled evaluator gives the same answers.

Every sub-expression is evaluated at every tick, both operands of `and` and
`or` included, so each windowed call sees its argument at every evaluation
whatever the rest of the condition decides (the inner call of a nested window
is evaluated, and pushed, before the outer one). Identical calls (equal syntax
trees; positions do not count) share one history: a call already evaluated at
this tick gives its value again without pushing a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

from dsl import ast
from dsl.builtins import ACTIONS, CONTEXT

Value = float | bool | None

# Strongest first: the verdict is the action of the first of these that fires.
PRIORITY = ("rollback", "pause", "promote", "continue")
# The actions whose rules make up the health score.
GUARDS = ("rollback", "pause")
WINDOWED = ("avg", "min", "max", "delta", "increase", "count")


@dataclass(frozen=True)
class OracleVerdict:
    """The oracle's decision at one tick; lists have one entry per rule, in written order."""

    action: str
    rule: str | None
    health: float
    conditions: list[bool | None]
    pending_since: list[float | None]


class Oracle:
    """Evaluates one policy over successive ticks; `step` advances its memory."""

    def __init__(self, policy: ast.Policy) -> None:
        self.rules: list[ast.Rule] = list(policy.rules)
        self.actions: list[str] = [ACTIONS[r.action].value for r in self.rules]
        self.holds: list[float] = [r.for_.value if r.for_ is not None else 0.0 for r in self.rules]
        self.pending: list[float | None] = [None] * len(self.rules)
        # (time, value of the call's first argument) at every evaluation so far.
        self.history: dict[ast.Call, list[tuple[float, Value]]] = {}
        self._now = 0.0
        self._snapshot: Mapping[str, float | None] = {}
        self._this_tick: dict[ast.Call, Value] = {}

    def step(self, now: float, snapshot: Mapping[str, float | None]) -> OracleVerdict:
        self._now = now
        self._snapshot = snapshot
        self._this_tick = {}
        conditions = [self._condition(rule.condition) for rule in self.rules]

        firing: list[bool] = []
        for i, cond in enumerate(conditions):
            if cond is True:
                if self.pending[i] is None:
                    self.pending[i] = now
                since = self.pending[i]
                assert since is not None
                firing.append(now - since >= self.holds[i])
            else:
                # False and unknown both reset a pending or firing rule.
                self.pending[i] = None
                firing.append(False)

        action, label = "continue", None
        for candidate in PRIORITY:
            chosen = [
                i for i in range(len(self.rules)) if firing[i] and self.actions[i] == candidate
            ]
            if chosen:
                action, label = candidate, self.rules[chosen[0]].label
                break

        guards = [i for i in range(len(self.rules)) if self.actions[i] in GUARDS]
        if guards:
            healthy = len([i for i in guards if conditions[i] is False])
            health = 100.0 * healthy / len(guards)
        else:
            health = 100.0
        return OracleVerdict(action, label, health, conditions, list(self.pending))

    # --- expressions ----------------------------------------------------------------

    def _condition(self, expr: ast.Expr) -> bool | None:
        value = self._eval(expr)
        assert value is None or isinstance(value, bool), f"not a condition: {expr}"
        return value

    def _eval(self, expr: ast.Expr) -> Value:
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Bool):
            return expr.value
        if isinstance(expr, ast.Ref):
            return self._ref(expr)
        if isinstance(expr, ast.Unary):
            return self._unary(expr.op, self._eval(expr.operand))
        if isinstance(expr, ast.Binary):
            return self._binary(expr.op, self._eval(expr.left), self._eval(expr.right))
        assert isinstance(expr, ast.Call)
        return self._call(expr)

    def _ref(self, ref: ast.Ref) -> Value:
        if ref.track is None and ref.name in CONTEXT:
            key = ref.name
        else:
            key = f"{ref.track or 'canary'}.{ref.name}"
        value = self._snapshot.get(key)
        return None if value is None else float(value)

    @staticmethod
    def _unary(op: str, x: Value) -> Value:
        if x is None:
            return None
        if op == "not":
            return not x
        assert op == "-"
        return -x

    @staticmethod
    def _binary(op: str, a: Value, b: Value) -> Value:
        if op == "and":
            if a is False or b is False:
                return False
            if a is None or b is None:
                return None
            return True
        if op == "or":
            if a is True or b is True:
                return True
            if a is None or b is None:
                return None
            return False
        if a is None or b is None:
            return None
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            if b == 0:
                return None
            return a / b
        if op == ">":
            return a > b
        if op == ">=":
            return a >= b
        if op == "<":
            return a < b
        if op == "<=":
            return a <= b
        if op == "==":
            return a == b
        assert op == "!=", op
        return a != b

    def _call(self, call: ast.Call) -> Value:
        if call.func == "absent":
            return self._eval(_expr(call.args[0])) is None
        if call.func == "abs":
            x = self._eval(_expr(call.args[0]))
            return None if x is None else abs(x)
        assert call.func in WINDOWED, call.func
        if call in self._this_tick:
            return self._this_tick[call]
        # The argument first: a window nested inside records its value before this one.
        argument = self._eval(_expr(call.args[0]))
        history = self.history.setdefault(call, [])
        history.append((self._now, argument))
        values = [v for _, v in self._in_window(history, call.args[1])]
        result = _aggregate(call.func, values)
        self._this_tick[call] = result
        return result

    def _in_window(
        self, history: list[tuple[float, Value]], window: ast.Expr | ast.LastN
    ) -> list[tuple[float, Value]]:
        if isinstance(window, ast.LastN):
            n = int(window.count.value)
            return history[len(history) - n :] if n < len(history) else history
        assert isinstance(window, ast.Number)
        # (t - w, t]: an evaluation exactly w ago has left the window.
        start = self._now - window.value
        return [(t, v) for t, v in history if start < t <= self._now]


def _expr(node: ast.Expr | ast.LastN) -> ast.Expr:
    assert not isinstance(node, ast.LastN)
    return node


def _aggregate(func: str, values: list[Value]) -> Value:
    """The value of a windowed function over its argument's values, oldest first."""
    if func == "count":
        return float(len([v for v in values if v is True]))
    known: list[float] = [float(v) for v in values if v is not None]
    if func in ("avg", "min", "max"):
        if not known:
            return None
        if func == "min":
            return min(known)
        if func == "max":
            return max(known)
        total = 0.0
        for v in known:
            total += v
        return total / len(known)
    if len(known) < 2:
        return None
    if func == "delta":
        return known[-1] - known[0]
    assert func == "increase", func
    rise = 0.0
    for previous, current in pairwise(known):
        # A drop means the counter restarted from zero: the new value counts in full.
        rise += current - previous if current >= previous else current
    return rise
