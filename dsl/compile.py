"""The compiler: a `CheckedPolicy` in, a `CompiledPolicy` (a fast, pure evaluator) out.

A policy is evaluated at every tick of every rollout, so the compiler turns
it into one straight-line Python function instead of walking the tree each
time. The generated code follows a fixed shape:

1. read every metric and context value the policy uses from the snapshot;
2. push the argument of every windowed call (`avg`, `count`, ...) into its
   window and compute the aggregate, innermost first, every tick (a window
   must see every evaluation, even where `and`/`or` would not look at it);
3. compute each rule's condition with Kleene logic (`None` is unknown);
4. advance each rule's `for` state as Prometheus does (pending, then firing);
5. pick the deciding rule in priority order and count the healthy rules.

Safety: the generated source is built only from our own templates and
variable names (`r0`, `t3`, `w1`). No text of the policy, not even a metric
name, appears in it: snapshot keys, literal values and durations reach the
function as closure variables. A policy therefore cannot inject code, and a
literal such as `1e999` never has to be spelled in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dsl import ast
from dsl.ast import Action
from dsl.check import CheckedPolicy, key_of
from dsl.runtime import PolicyState, Snapshot, Verdict, Window

_UNROLL = 64  # up to this many rules, selection and health are unrolled straight-line code

_Tick = Callable[[float, Snapshot, PolicyState], tuple[int, int, tuple[bool | None, ...]]]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    label: str
    action: Action
    for_seconds: float
    node: ast.Rule


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One windowed call: its node, and a duration or a count of evaluations."""

    call: ast.Call
    seconds: float | None
    last_n: int | None


class CompiledPolicy:
    """A policy ready to evaluate. Immutable; its state lives in `PolicyState`."""

    def __init__(
        self,
        checked: CheckedPolicy,
        rules: tuple[CompiledRule, ...],
        windows: tuple[WindowSpec, ...],
        tick: _Tick,
        source: str,
        source_hash: str,
        path: str,
    ) -> None:
        self.checked = checked
        self.rules = rules
        self.windows = windows
        self.window_index: Mapping[ast.Call, int] = {w.call: i for i, w in enumerate(windows)}
        self.metric_keys = checked.metric_keys
        self.context_keys = checked.context_keys
        self.source = source
        self.source_hash = source_hash
        self.path = path
        self._tick = tick
        self.generated_source = ""  # the Python the compiler wrote, for review and tests
        self._rule_info = tuple((r.label, r.action) for r in rules)
        self._health_rules = sum(r.action in (Action.ROLLBACK, Action.PAUSE) for r in rules)
        seconds = [w.seconds for w in windows if w.seconds is not None]
        counts = [w.last_n for w in windows if w.last_n is not None]
        self.longest_window_seconds = max(seconds, default=0.0)
        self.longest_window_evaluations = max(counts, default=0)

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.path!r}, {len(self.rules)} rules)"

    def new_state(self) -> PolicyState:
        n = len(self.rules)
        return PolicyState(
            windows=[Window(w.seconds, w.last_n) for w in self.windows],
            pending_since=[None] * n,
            firing=[False] * n,
            window_values=[None] * len(self.windows),
        )

    def evaluate(self, now: float, snapshot: Snapshot, state: PolicyState) -> Verdict:
        """The verdict at time `now`; advances `state` in place. Ticks must increase."""
        if state.last_tick is not None and now <= state.last_tick:
            raise ValueError(f"ticks must increase: {now} after {state.last_tick}")
        state.last_tick = now
        decider, healthy, conditions = self._tick(now, snapshot, state)
        health = 100.0 if not self._health_rules else healthy * 100.0 / self._health_rules
        pending = tuple(state.pending_since)
        firing = tuple(state.firing)
        if decider < 0:
            return Verdict(
                now, Action.CONTINUE, None, "continue: no rule fires", health, None, (),
                conditions, pending, firing, self._rule_info,
            )
        from dsl.explain import explain_rule

        rule = self.rules[decider]
        since = pending[decider]
        true_for = now - since if since is not None else 0.0
        values, text = explain_rule(self, rule.node.condition, snapshot, state)
        explanation = f"{rule.action.value}: {rule.label}: {text}"
        if rule.for_seconds or true_for:
            from dsl.units import format_duration

            explanation += f", true for {format_duration(true_for)}"
        return Verdict(
            now, rule.action, rule.label, explanation, health, true_for, values,
            conditions, pending, firing, self._rule_info,
        )


def compile_policy(
    checked: CheckedPolicy, source_hash: str = "", path: str = "<policy>", source: str = ""
) -> CompiledPolicy:
    rules = tuple(
        CompiledRule(r.label, r.action, r.for_seconds, r.node) for r in checked.rules
    )
    gen = _Generator()
    for r in rules:
        gen.collect_windows(r.node.condition)
    tick = gen.build(rules)
    policy = CompiledPolicy(checked, rules, tuple(gen.windows), tick, source, source_hash, path)
    policy.generated_source = gen.source
    return policy


# --- code generation -----------------------------------------------------------


class _Generator:
    def __init__(self) -> None:
        self.windows: list[WindowSpec] = []
        self.window_of: dict[ast.Call, int] = {}
        self.consts: dict[str, Any] = {}
        self.const_of: dict[tuple[type, Any], str] = {}
        self.refs: dict[str, str] = {}
        self.lines: list[str] = []
        self.temp = 0
        self.source = ""

    # closure variables: every value from the policy enters the code this way
    def const(self, value: Any) -> str:
        key = (type(value), value)
        if key not in self.const_of:
            name = f"k{len(self.consts)}"
            self.consts[name] = value
            self.const_of[key] = name
        return self.const_of[key]

    def fresh(self) -> str:
        self.temp += 1
        return f"t{self.temp}"

    def emit(self, line: str, indent: int) -> None:
        self.lines.append("    " * indent + line)

    def collect_windows(self, node: ast.Expr | ast.LastN) -> None:
        """Post-order: inner windows get lower indexes and are computed first."""
        for child in ast.children(node):
            self.collect_windows(child)
        if isinstance(node, ast.Call) and len(node.args) == 2 and node not in self.window_of:
            arg = node.args[1]
            if isinstance(arg, ast.LastN):
                spec = WindowSpec(node, None, int(arg.count.value))
            else:
                assert isinstance(arg, ast.Number)
                spec = WindowSpec(node, arg.value, None)
            self.window_of[node] = len(self.windows)
            self.windows.append(spec)

    def build(self, rules: tuple[CompiledRule, ...]) -> _Tick:
        body = 2
        self.emit("wins = st.windows", body)
        self.emit("wv = st.window_values", body)
        self.emit("ps = st.pending_since", body)
        self.emit("fi = st.firing", body)
        for i, spec in enumerate(self.windows):
            self._window(i, spec, body)
        conds = []
        for r in rules:
            code, _ = self.expr(r.node.condition, body)
            if not code.isidentifier() or code in ("True", "False"):
                c = self.fresh()
                self.emit(f"{c} = {code}", body)
                code = c
            conds.append(code)
        firing = []
        for i, (r, c) in enumerate(zip(rules, conds, strict=True)):
            f = f"f{i}"
            self.emit(f"if {c} is True:", body)
            self.emit(f"p = ps[{i}]", body + 1)
            self.emit("if p is None:", body + 1)
            self.emit(f"ps[{i}] = p = now", body + 2)
            if r.for_seconds:
                self.emit(f"{f} = now - p >= {self.const(r.for_seconds)}", body + 1)
            else:
                self.emit(f"{f} = True", body + 1)
            self.emit("else:", body)
            self.emit(f"ps[{i}] = None", body + 1)
            self.emit(f"{f} = False", body + 1)
            self.emit(f"fi[{i}] = {f}", body)
            firing.append(f)
        order = sorted(range(len(rules)), key=lambda i: (rules[i].action.priority, i))
        # Flat code only: a chain of 3,000 `elif`s or `+`s is too deep for
        # CPython's own compiler, so long policies use a loop and a tuple.
        if len(rules) <= _UNROLL:
            self.emit("d = -1", body)
            for n, i in enumerate(order):
                self.emit(f"{'if' if n == 0 else 'elif'} {firing[i]}:", body)
                self.emit(f"d = {i}", body + 1)
        else:
            self.emit(f"d = next((i for i in {self.const(tuple(order))} if fi[i]), -1)", body)
        healthy = [
            c for r, c in zip(rules, conds, strict=True)
            if r.action in (Action.ROLLBACK, Action.PAUSE)
        ]
        if len(healthy) <= _UNROLL:
            self.emit(f"h = {' + '.join(f'({c} is False)' for c in healthy) or '0'}", body)
        else:
            # conditions are True, False or None, so counting `== False` counts False alone
            self.emit(f"h = ({''.join(c + ', ' for c in healthy)}).count(False)", body)
        self.emit(f"return d, h, ({''.join(c + ', ' for c in conds)})", body)
        return self._assemble()

    def _assemble(self) -> _Tick:
        reads = [f"        {var} = get({self.const(key)})" for key, var in self.refs.items()]
        head = [f"def _make({', '.join(self.consts)}):", "    def tick(now, m, st):"]
        head.append("        get = m.get")
        source = "\n".join([*head, *reads, *self.lines, "    return tick"])
        namespace: dict[str, Any] = {}
        exec(compile(source, "<codedance policy>", "exec"), namespace)
        tick: _Tick = namespace["_make"](**self.consts)
        self.source = source
        return tick

    # expressions: each returns (python expression, may it be None?)
    def expr(self, node: ast.Expr | ast.LastN, ind: int) -> tuple[str, bool]:
        if isinstance(node, ast.Number):
            return self.const(node.value), False
        if isinstance(node, ast.Bool):
            return ("True" if node.value else "False"), False
        if isinstance(node, ast.Ref):
            key = key_of(node)
            if key not in self.refs:
                self.refs[key] = f"r{len(self.refs)}"
            return self.refs[key], True
        if isinstance(node, ast.Call):
            return self._call(node, ind)
        if isinstance(node, ast.Unary):
            a, na = self.expr(node.operand, ind)
            op = "not " if node.op == "not" else "-"
            if not na:
                return f"({op}{a})", False
            t = self.fresh()
            self.emit(f"{t} = None if {a} is None else {op}{a}", ind)
            return t, True
        if isinstance(node, ast.LastN):  # the checker allows it only as a window
            raise AssertionError("`last N` outside a window")
        if node.op in ("and", "or"):
            return self._logic(node, ind)
        a, na = self.expr(node.left, ind)
        b, nb = self.expr(node.right, ind)
        guards = [f"{x} is None" for x, n in ((a, na), (b, nb)) if n]
        if node.op == "/":
            guards.append(f"{b} == 0")
        value = f"{a} {node.op} {b}"
        if not guards:
            return f"({value})", False
        t = self.fresh()
        self.emit(f"{t} = None if {' or '.join(guards)} else {value}", ind)
        return t, True

    def _logic(self, node: ast.Binary, ind: int) -> tuple[str, bool]:
        # Kleene: false and x = false; true or x = true; otherwise unknown wins.
        stop, other = ("False", "True") if node.op == "and" else ("True", "False")
        a, _ = self.expr(node.left, ind)
        t = self.fresh()
        self.emit(f"{t} = {a}", ind)
        self.emit(f"if {t} is not {stop}:", ind)
        b, _ = self.expr(node.right, ind + 1)
        self.emit(f"if {b} is {stop}:", ind + 1)
        self.emit(f"{t} = {stop}", ind + 2)
        self.emit(f"elif {t} is None or {b} is None:", ind + 1)
        self.emit(f"{t} = None", ind + 2)
        self.emit("else:", ind + 1)
        self.emit(f"{t} = {other}", ind + 2)
        return t, True

    def _call(self, node: ast.Call, ind: int) -> tuple[str, bool]:
        if node in self.window_of:
            return f"w{self.window_of[node]}", node.func != "count"  # a count is never unknown
        arg = node.args[0]
        assert not isinstance(arg, ast.LastN)
        a, na = self.expr(arg, ind)
        if node.func == "absent":
            return (f"({a} is None)" if na else "False"), False
        if not na:
            return f"abs({a})", False
        t = self.fresh()
        self.emit(f"{t} = None if {a} is None else abs({a})", ind)
        return t, True

    def _window(self, i: int, spec: WindowSpec, ind: int) -> None:
        arg = spec.call.args[0]
        assert not isinstance(arg, ast.LastN)
        x, _ = self.expr(arg, ind)
        w = f"w{i}"
        self.emit(f"items = wins[{i}].items", ind)
        self.emit(f"items.append((now, {x}))", ind)
        if spec.seconds is not None:
            self.emit(f"cut = now - {self.const(spec.seconds)}", ind)
            self.emit("while items and items[0][0] <= cut:", ind)
            self.emit("items.popleft()", ind + 1)
        func = spec.call.func
        if func == "count":
            self.emit(f"{w} = sum([1 for _, v in items if v is True])", ind)
        else:
            self.emit("vs = [v for _, v in items if v is not None]", ind)
            agg = {
                "avg": f"{w} = sum(vs) / len(vs) if vs else None",
                "min": f"{w} = min(vs) if vs else None",
                "max": f"{w} = max(vs) if vs else None",
                "delta": f"{w} = vs[-1] - vs[0] if len(vs) > 1 else None",
                "increase": f"{w} = {self.const(_increase)}(vs)",
            }[func]
            self.emit(agg, ind)
        self.emit(f"wv[{i}] = {w}", ind)


def _increase(values: list[float]) -> float | None:
    """A counter's rise over a window, where a drop means it restarted from zero."""
    if len(values) < 2:
        return None
    total = 0.0
    prev = values[0]
    for v in values[1:]:
        total += v - prev if v >= prev else v
        prev = v
    return total
