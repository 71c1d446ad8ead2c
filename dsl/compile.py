"""The compiler: a `CheckedPolicy` in, a `CompiledPolicy` (a fast, pure evaluator) out.

A policy is evaluated at every tick of every rollout, so the compiler turns
it into straight-line Python instead of walking the tree each time. The
generated code follows a fixed shape, in parts of at most PART_LINES lines
(CPython compiles one huge function in superlinear time), each part for a run
of consecutive rules:

1. read the metric and context values its rules use from the snapshot;
2. before a rule, push the argument of each windowed call (`avg`, `count`,
   ...) it is first to use into its window and compute the aggregate,
   innermost first, every tick (a window must see every evaluation, even where
   `and`/`or` would not look at it); later parts read the stored aggregate;
3. compute each rule's condition with Kleene logic (`None` is unknown), one
   statement per comparison tree and per `and`/`or`;
4. hand the conditions to `_advance`, which moves each rule's `for` state as
   Prometheus does (pending, then firing), picks the part's deciding rule in
   priority order and counts its healthy rules.

Safety: the generated source is built only from our own templates and
variable names (`r0`, `t3`, `w1`). No text of the policy, not even a metric
name, appears in it: snapshot keys, literal values and durations reach the
function as closure variables. A policy therefore cannot inject code, and a
literal such as `1e999` never has to be spelled in Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dsl import ast
from dsl.ast import Action
from dsl.check import CheckedPolicy, key_of
from dsl.runtime import PolicyState, Snapshot, Verdict, Window

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
        make_tick: Callable[[], _Tick],
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
        # Python compiles the generated source at the first evaluation (or `prepare()`):
        # checking a policy, or loading a directory of them, never pays for bytecode
        # of policies nobody runs.
        self._make_tick = make_tick
        self._tick: _Tick = self._first_tick
        self.generated_source = ""  # the Python the compiler wrote, for review and tests
        self._rule_info = tuple((r.label, r.action) for r in rules)
        self._health_rules = sum(r.action in (Action.ROLLBACK, Action.PAUSE) for r in rules)
        seconds = [w.seconds for w in windows if w.seconds is not None]
        counts = [w.last_n for w in windows if w.last_n is not None]
        self.longest_window_seconds = max(seconds, default=0.0)
        self.longest_window_evaluations = max(counts, default=0)

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.path!r}, {len(self.rules)} rules)"

    def prepare(self) -> None:
        """Compile the evaluator now rather than at the first evaluation."""
        if self._tick == self._first_tick:
            self._tick = self._make_tick()

    def _first_tick(
        self, now: float, snapshot: Snapshot, state: PolicyState
    ) -> tuple[int, int, tuple[bool | None, ...]]:
        self.prepare()
        return self._tick(now, snapshot, state)

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
                now, Action.CONTINUE, None, health, None, conditions, pending, firing,
                self._rule_info,
            )
        since = pending[decider]
        true_for = now - since if since is not None else 0.0
        # What the explanation needs, frozen now: the caller may reuse its snapshot.
        because = functools.partial(
            self._explain, decider, true_for, dict(snapshot), list(state.window_values)
        )
        rule = self.rules[decider]
        return Verdict(
            now, rule.action, rule.label, health, true_for, conditions, pending, firing,
            self._rule_info, because,
        )

    def _explain(
        self, decider: int, true_for: float, snapshot: Snapshot, window_values: list[Any]
    ) -> tuple[tuple[tuple[str, str], ...], str]:
        from dsl.explain import explain_rule
        from dsl.units import format_duration

        rule = self.rules[decider]
        state = PolicyState([], [], [], window_values)
        values, text = explain_rule(self, rule.node.condition, snapshot, state)
        explanation = f"{rule.action.value}: {rule.label}: {text}"
        if rule.for_seconds or true_for:
            explanation += f", true for {format_duration(true_for)}"
        return values, explanation


def compile_policy(
    checked: CheckedPolicy, source_hash: str = "", path: str = "<policy>", source: str = ""
) -> CompiledPolicy:
    rules = tuple(
        CompiledRule(r.label, r.action, r.for_seconds, r.node) for r in checked.rules
    )
    gen = _Generator()
    for r in rules:
        gen.rule_windows.append([])
        gen.collect_windows(r.node.condition)
    make_tick = gen.build(rules)
    policy = CompiledPolicy(
        checked, rules, tuple(gen.windows), make_tick, source, source_hash, path
    )
    policy.generated_source = gen.source
    return policy


# --- code generation -----------------------------------------------------------


PART_LINES = 1500


class _Generator:
    def __init__(self) -> None:
        self.windows: list[WindowSpec] = []
        self.window_of: dict[ast.Call, int] = {}
        # Hashing a node hashes its whole subtree; look calls up by identity after
        # the one hash per call that finds equal calls.
        self.window_at: dict[int, int] = {}
        self.rule_windows: list[list[int]] = []
        self.consts: dict[str, Any] = {}
        self.const_of: dict[tuple[type, Any, Any], str] = {}
        self.refs: dict[str, str] = {}
        self.lines: list[str] = []
        self.temp = 0
        self.source = ""

    # closure variables: every value from the policy enters the code this way
    def const(self, value: Any) -> str:
        # (0,) == (0.0,): tuples are told apart by their items' types too
        key = (type(value), tuple(map(type, value)) if isinstance(value, tuple) else (), value)
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
        if isinstance(node, ast.Call) and len(node.args) == 2:
            index = self.window_of.get(node)
            if index is not None:
                self.window_at[id(node)] = index
                self.rule_windows[-1].append(index)
                return
            arg = node.args[1]
            if isinstance(arg, ast.LastN):
                spec = WindowSpec(node, None, int(arg.count.value))
            else:
                assert isinstance(arg, ast.Number)
                spec = WindowSpec(node, arg.value, None)
            self.window_of[node] = self.window_at[id(node)] = len(self.windows)
            self.rule_windows[-1].append(len(self.windows))
            self.windows.append(spec)

    # CPython compiles one huge function in superlinear time (a 2,000-rule body
    # takes 3x as long per line as a 500-rule one), so a large policy becomes
    # several part functions of at most PART_LINES lines, called in turn.
    def build(self, rules: tuple[CompiledRule, ...]) -> Callable[[], _Tick]:
        self.parts: list[str] = []
        self.rank = [0] * len(rules)
        order = sorted(range(len(rules)), key=lambda i: (rules[i].action.priority, i))
        for n, i in enumerate(order):
            self.rank[i] = n
        done: set[int] = set()
        members: list[int] = []
        conds: list[str] = []
        self._open()
        for i, r in enumerate(rules):
            if len(self.lines) > PART_LINES:
                self._close(rules, members, conds)
                members, conds = [], []
                self._open()
            for wi in sorted(set(self.rule_windows[i])):
                if wi not in done:
                    self._window(wi, self.windows[wi], 2)
                    self.local_windows.add(wi)
                    done.add(wi)
            code, _ = self.expr(r.node.condition, 2)
            if not code.isidentifier() or code in ("True", "False"):
                c = self.fresh()
                self.emit(f"{c} = {code}", 2)
                code = c
            members.append(i)
            conds.append(code)
        self._close(rules, members, conds)
        return self._assemble()

    def _open(self) -> None:
        self.lines = []
        self.refs = {}
        self.local_windows: set[int] = set()
        self.loaded_windows: set[int] = set()

    def _close(self, rules: tuple[CompiledRule, ...], members: list[int], conds: list[str]) -> None:
        body = 2
        first = members[0] if members else 0  # a policy may have no rules
        holds = tuple(rules[i].for_seconds for i in members)
        order = tuple(sorted(members, key=lambda i: self.rank[i]))
        guards = tuple(
            j for j, i in enumerate(members) if rules[i].action in (Action.ROLLBACK, Action.PAUSE)
        )
        self.emit(f"c = ({''.join(c + ', ' for c in conds)})", body)
        self.emit(
            f"return {self.const(_advance)}(now, c, {first}, {self.const(holds)}, "
            f"{self.const(order)}, {self.const(guards)}, ps, fi) + (c,)",
            body,
        )
        head = [f"    def part{len(self.parts)}(now, m, st):", "        get = m.get"]
        head += ["        wins = st.windows", "        wv = st.window_values"]
        head += ["        ps = st.pending_since", "        fi = st.firing"]
        head += [f"        {var} = get({self.const(key)})" for key, var in self.refs.items()]
        head += [f"        w{i} = wv[{i}]" for i in sorted(self.loaded_windows)]
        self.parts.append("\n".join([*head, *self.lines]))

    def _assemble(self) -> Callable[[], _Tick]:
        lines = [f"def _make({', '.join([*self.consts, 'rank'])}):", *self.parts]
        if len(self.parts) == 1:
            lines.append("    return part0")
        else:
            n = len(self.parts)
            lines.append("    def tick(now, m, st):")
            for k in range(n):
                lines.append(f"        d{k}, h{k}, c{k} = part{k}(now, m, st)")
            lines.append("        d = d0")
            for k in range(1, n):
                lines.append(f"        if d{k} >= 0 and (d < 0 or rank[d{k}] < rank[d]):")
                lines.append(f"            d = d{k}")
            lines.append(f"        return d, {' + '.join(f'h{k}' for k in range(n))}, "
                         f"{' + '.join(f'c{k}' for k in range(n))}")
            lines.append("    return tick")
        source = "\n".join(lines)
        self.source = source
        consts, rank = self.consts, self.rank

        def make() -> _Tick:
            namespace: dict[str, Any] = {}
            exec(compile(source, "<codedance policy>", "exec"), namespace)
            tick: _Tick = namespace["_make"](**consts, rank=rank)
            return tick

        return make

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
        # One statement for a whole arithmetic and comparison tree: it is unknown
        # when any operand is, or a divisor is zero (tested after the operands).
        value, unknown, zero = self._arith(node, ind)
        guards = list(dict.fromkeys(unknown)) + zero
        if not guards:
            return value, False
        t = self.fresh()
        self.emit(f"{t} = None if {' or '.join(guards)} else {value}", ind)
        return t, True

    def _arith(self, node: ast.Expr, ind: int) -> tuple[str, list[str], list[str]]:
        """(value, names that make it unknown when None, divisors that must not be 0)."""
        if isinstance(node, ast.Binary) and node.op not in ("and", "or"):
            a, ua, za = self._arith(node.left, ind)
            b, ub, zb = self._arith(node.right, ind)
            zero = za + zb + ([f"{b} == 0"] if node.op == "/" else [])
            return f"({a} {node.op} {b})", ua + ub, zero
        if isinstance(node, ast.Unary) and node.op == "-":
            a, ua, za = self._arith(node.operand, ind)
            return f"(-{a})", ua, za
        code, nullable = self.expr(node, ind)
        return code, [f"{code} is None"] if nullable else [], []

    def _logic(self, node: ast.Binary, ind: int) -> tuple[str, bool]:
        # Kleene: false and x = false; true or x = true; otherwise unknown wins.
        # Both sides are computed (they are side-effect free: windows were pushed
        # already), which keeps this one line instead of a branch per operator.
        stop, other = ("False", "True") if node.op == "and" else ("True", "False")
        a, na = self.expr(node.left, ind)
        b, nb = self.expr(node.right, ind)
        if not na and not nb:
            return f"({a} {node.op} {b})", False
        t = self.fresh()
        unknown = " or ".join(f"{x} is None" for x, n in ((a, na), (b, nb)) if n)
        self.emit(
            f"{t} = {stop} if {a} is {stop} or {b} is {stop} else None if {unknown} else {other}",
            ind,
        )
        return t, True

    def _call(self, node: ast.Call, ind: int) -> tuple[str, bool]:
        wi = self.window_at.get(id(node))
        if wi is not None:
            if wi not in self.local_windows:
                self.loaded_windows.add(wi)
            return f"w{wi}", node.func != "count"  # a count is never unknown
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
        agg = self.const(_AGGREGATES[spec.call.func])
        self.emit(f"w{i} = wv[{i}] = {agg}(wins[{i}], now, {x})", ind)


def _known(w: Window, now: float, x: Any) -> list[Any]:
    """Push this tick's value; the known values of the window, oldest first."""
    w.push(now, x)
    return [v for _, v in w.items if v is not None]


def _avg(w: Window, now: float, x: Any) -> Any:
    vs = _known(w, now, x)
    return sum(vs) / len(vs) if vs else None


def _min(w: Window, now: float, x: Any) -> Any:
    vs = _known(w, now, x)
    return min(vs) if vs else None


def _max(w: Window, now: float, x: Any) -> Any:
    vs = _known(w, now, x)
    return max(vs) if vs else None


def _delta(w: Window, now: float, x: Any) -> Any:
    vs = _known(w, now, x)
    return vs[-1] - vs[0] if len(vs) > 1 else None


def _count(w: Window, now: float, x: Any) -> Any:
    w.push(now, x)
    return sum([1 for _, v in w.items if v is True])


def _increase_w(w: Window, now: float, x: Any) -> Any:
    return _increase(_known(w, now, x))


_AGGREGATES = {"avg": _avg, "min": _min, "max": _max, "delta": _delta, "count": _count,
               "increase": _increase_w}


def _advance(
    now: float,
    conds: tuple[bool | None, ...],
    first: int,
    holds: tuple[float, ...],
    order: tuple[int, ...],
    guards: tuple[int, ...],
    ps: list[float | None],
    fi: list[bool],
) -> tuple[int, int]:
    """Advance the `for` state of rules first.. (as Prometheus does); (decider, healthy)."""
    i = first
    for c, hold in zip(conds, holds, strict=True):
        if c is True:
            p = ps[i]
            if p is None:
                ps[i] = p = now
            fi[i] = now - p >= hold
        else:
            ps[i] = None
            fi[i] = False
        i += 1
    decider = -1
    for i in order:
        if fi[i]:
            decider = i
            break
    healthy = 0
    for j in guards:
        if conds[j] is False:
            healthy += 1
    return decider, healthy


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
