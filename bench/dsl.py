"""Benchmarks of the policy language: how fast a tick is evaluated and a file loaded.

In: nothing (the policy, the metric series and the 1,000-rule file are
generated here, deterministically). Out: one line per figure, `NAME RATIOx`,
where the ratio is our time divided by a reference's time for the same work,
followed by indented details (absolute times) and a note for any figure that
misses its goal:

- `eval_vs_handwritten`: `CompiledPolicy.evaluate` of a 20-rule policy, tick
  by tick over a few thousand ticks, against `hand_evaluate`, the same policy
  written by hand in plain Python. Goal <= 1.5x.
- `eval_vs_interpreter`: the same ticks against the reference interpreter of
  the test suite (`tests/dsl/oracle.py`). Goal <= 0.2x.
- `compile_vs_parse`: `dsl.load` (parse, check, compile) of a 1,000-rule file
  against lark's bare LALR parse of the same text. Goal <= 2x.

The machine is shared, so absolute times mean little. Variants are measured
in rounds, interleaved (each round runs every variant once, in a rotating
order), timed with the process CPU clock and with the garbage collector off
(as `timeit` does); a ratio compares the best round of each variant, and the
details give the medians too. Before timing, every evaluator is run over the
whole series and must agree with the compiled policy at every tick, so a
ratio always compares two computations of the same verdicts.

Run from the repository root: `.venv/bin/python bench/dsl.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Run as a script, this file's folder comes first on sys.path and would shadow
# the `dsl` package with this very file; put the repository root there instead.
_ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
    sys.path.insert(0, str(_ROOT))

import dsl  # noqa: E402
from dsl.ast import Action  # noqa: E402
from dsl.compile import CompiledPolicy  # noqa: E402
from dsl.parser import bare_parser, parse  # noqa: E402
from dsl.runtime import Verdict  # noqa: E402

if TYPE_CHECKING:
    from tests.dsl.oracle import OracleVerdict

Snapshot = dict[str, float | None]
Series = list[tuple[float, Snapshot]]

INTERVAL = 10.0  # seconds between ticks

GOALS: dict[str, float] = {
    "eval_vs_handwritten": 1.5,
    "eval_vs_interpreter": 0.2,
    "compile_vs_parse": 2.0,
}


class BenchError(Exception):
    """The benchmark cannot give an honest figure (evaluators disagree, a file fails)."""


# --- the 20-rule policy --------------------------------------------------------------

POLICY = """\
# a checkout service: 20 rules using every kind of condition the language has
latency:    p99 > 300ms for 2m -> rollback
errors:     error_rate > 1% for 1m -> rollback
relative:   canary.p99 > stable.p99 * 1.5 and canary.p99 > 100ms for 3m -> pause
crashing:   failed_pods > 0 or increase(restarts, 5m) >= 3 -> rollback
flapping:   count(p99 > 250ms, 10m) >= 40 -> pause
no_data:    absent(p99) for 5m -> pause
early_win:  weight >= 50 and success_rate >= 99.9% for 10m -> promote
p90_trend:  avg(p90, 5m) > 200ms for 1m -> pause
p50_spike:  max(p50, last 6) > 150ms -> pause
err_rel:    canary.error_rate > stable.error_rate * 2 and canary.error_rate > 0.5% for 2m -> rollback
succ_drop:  success_rate < stable.success_rate - 1% for 2m -> pause
cpu_hot:    avg(cpu, 3m) > stable.cpu * 1.3 + 0.1 for 2m -> pause
memory:     max(memory, 5m) > 2Gi -> rollback
not_ready:  not_ready_pods > 1 and not (weight < 10) for 1m -> pause
traffic:    request_rate < stable.request_rate * weight / 100 * 0.5 for 3m -> pause
err_burst:  count(error_rate > 2%, last 10) >= 3 -> rollback
no_stable:  absent(stable.p99) or absent(stable.error_rate) for 2m -> pause
restarts:   increase(restarts, 10m) > increase(stable.restarts, 10m) + 2 for 1m -> pause
steady:     step >= 2 and avg(success_rate, 10m) >= 99.5% and not absent(p99) and max(p99, 10m) < 350ms for 5m -> promote
on_track:   weight < 100 and not (canary.p99 > stable.p99 * 1.2 or error_rate > 0.5%) -> continue
"""  # noqa: E501  (rules are one per line; two of them are long)


# --- a realistic series ---------------------------------------------------------------


def make_series(ticks: int, seed: int = 7) -> Series:
    """`ticks` snapshots 10 s apart: values drifting across the policy's thresholds.

    Slow waves of different periods plus noise keep each rule crossing its
    threshold (pending, firing, resetting); bursts, counter resets and outages
    add unknown values (a None, a missing key, a metric gone for minutes).
    """
    rng = random.Random(seed)
    out: Series = []
    restarts = stable_restarts = 0.0
    canary_outage = stable_outage = burst = failing = not_ready = 0

    def wave(i: int, period: float, phase: float) -> float:
        return math.sin(2.0 * math.pi * i / period + phase)

    for i in range(ticks):
        now = INTERVAL * (i + 1)
        step = float(min(i // 30, 9))  # a new step every 5 minutes, weight 10..100
        weight = 10.0 * (step + 1.0)
        if rng.random() < 0.0015:
            canary_outage = rng.randint(15, 45)
        if rng.random() < 0.003:
            stable_outage = rng.randint(5, 20)
        if rng.random() < 0.006:
            burst = rng.randint(3, 15)
        if rng.random() < 0.006:
            failing = rng.randint(2, 8)
        if rng.random() < 0.01:
            not_ready = rng.randint(3, 12)
        if rng.random() < 0.03:
            restarts += 1.0
        if rng.random() < 0.003:
            restarts = 0.0  # the pod was replaced: the counter starts over
        if rng.random() < 0.02:
            stable_restarts += 1.0

        s_p99 = 0.18 + 0.02 * wave(i, 97, 0.0) + rng.gauss(0.0, 0.01)
        p99 = 0.22 + 0.11 * wave(i, 90, 1.0) + 0.015 * wave(i, 11, 2.0) + rng.gauss(0.0, 0.012)
        s_err = max(0.0, 0.003 + rng.gauss(0.0, 0.001))
        err = max(0.0, 0.003 + 0.008 * wave(i, 151, 0.5) + rng.gauss(0.0, 0.001))
        if burst:
            err += 0.025
            burst -= 1
        s_rps = 200.0 + 20.0 * wave(i, 120, 0.0) + rng.gauss(0.0, 5.0)
        snap: Snapshot = {
            "canary.p99": max(0.01, p99),
            "stable.p99": max(0.01, s_p99),
            "canary.p90": 0.17 + 0.04 * wave(i, 67, 2.0) + rng.gauss(0.0, 0.01),
            "canary.p50": 0.09 + 0.045 * wave(i, 41, 0.3) + rng.gauss(0.0, 0.01),
            "canary.error_rate": err,
            "stable.error_rate": s_err,
            "canary.success_rate": max(0.0, 1.0 - err - abs(rng.gauss(0.0, 0.0003))),
            "stable.success_rate": max(0.0, 1.0 - s_err - abs(rng.gauss(0.0, 0.0006))),
            "canary.failed_pods": 1.0 if failing else 0.0,
            "canary.not_ready_pods": 2.0 if not_ready else 0.0,
            "canary.restarts": restarts,
            "stable.restarts": stable_restarts,
            "canary.cpu": 0.55 + 0.15 * wave(i, 83, 1.5) + rng.gauss(0.0, 0.03),
            "stable.cpu": 0.42 + rng.gauss(0.0, 0.02),
            "canary.memory": (1.65 + 0.3 * wave(i, 131, 0.0) + rng.gauss(0.0, 0.03)) * 2.0**30,
            "canary.request_rate": s_rps * weight / 100.0 * (0.8 + 0.4 * wave(i, 120, 2.5)),
            "stable.request_rate": s_rps,
            "weight": weight,
            "step": step,
            "elapsed": now,
            "step_elapsed": now - step * 300.0,
        }
        failing = max(0, failing - 1)
        not_ready = max(0, not_ready - 1)
        if canary_outage:
            for key in ("canary.p99", "canary.p90", "canary.p50"):
                del snap[key]
            canary_outage -= 1
        if stable_outage:
            snap["stable.p99"] = snap["stable.error_rate"] = None
            stable_outage -= 1
        for key in list(snap):
            draw = rng.random()
            if draw < 0.015:
                snap[key] = None  # the query failed this tick
            elif draw < 0.02:
                del snap[key]  # the source had no sample
        out.append((now, snap))
    return out


# --- the same policy, written by hand ----------------------------------------------

LABELS = (
    "latency", "errors", "relative", "crashing", "flapping", "no_data", "early_win",
    "p90_trend", "p50_spike", "err_rel", "succ_drop", "cpu_hot", "memory", "not_ready",
    "traffic", "err_burst", "no_stable", "restarts", "steady", "on_track",
)  # fmt: skip
_R, _P, _A, _C = Action.ROLLBACK, Action.PAUSE, Action.PROMOTE, Action.CONTINUE
ACTIONS = (_R, _R, _P, _R, _P, _P, _A, _P, _P, _R, _P, _P, _R, _P, _P, _R, _P, _P, _A, _C)
HOLDS = (120.0, 60.0, 180.0, 0.0, 0.0, 300.0, 600.0, 60.0, 0.0, 120.0,
         120.0, 120.0, 0.0, 60.0, 180.0, 0.0, 120.0, 60.0, 300.0, 0.0)  # fmt: skip
# Rules in the order they win: stronger action first, then written order.
DECISION_ORDER = tuple(sorted(range(len(ACTIONS)), key=lambda i: (ACTIONS[i].priority, i)))
GUARDS = tuple(i for i, a in enumerate(ACTIONS) if a in (_R, _P))
GIB = 2.0**30


@dataclass(frozen=True, slots=True)
class HandVerdict:
    """What `hand_evaluate` decides at one tick; compared field by field with a `Verdict`."""

    at: float
    action: Action
    rule: str | None
    health: float
    true_for: float | None
    conditions: tuple[bool | None, ...]
    pending_since: tuple[float | None, ...]
    firing: tuple[bool, ...]


class HandState:
    """The hand-written policy's memory: one deque per window, pending and firing lists."""

    __slots__ = (
        "avg_cpu_3m", "avg_p90_5m", "avg_success_10m", "err_over_2pc_last10", "firing",
        "max_memory_5m", "max_p50_last6", "max_p99_10m", "p99_over_250ms_10m", "pending",
        "restarts_10m", "stable_restarts_10m",
    )  # fmt: skip

    def __init__(self) -> None:
        # Timed windows keep (time, value) of known values only: unknowns count for nothing.
        self.restarts_10m: deque[tuple[float, float]] = deque()  # also serves the 5m increase
        self.stable_restarts_10m: deque[tuple[float, float]] = deque()
        self.p99_over_250ms_10m: deque[float] = deque()  # the times the condition held
        self.avg_p90_5m: deque[tuple[float, float]] = deque()
        self.avg_cpu_3m: deque[tuple[float, float]] = deque()
        self.max_memory_5m: deque[tuple[float, float]] = deque()
        self.avg_success_10m: deque[tuple[float, float]] = deque()
        self.max_p99_10m: deque[tuple[float, float]] = deque()
        # `last N` windows count evaluations, unknown ones included.
        self.max_p50_last6: deque[float | None] = deque(maxlen=6)
        self.err_over_2pc_last10: deque[bool | None] = deque(maxlen=10)
        self.pending: list[float | None] = [None] * len(LABELS)
        self.firing: list[bool] = [False] * len(LABELS)


def _push(window: deque[tuple[float, float]], now: float, value: float | None, cut: float) -> None:
    if value is not None:
        window.append((now, value))
    while window and window[0][0] <= cut:
        window.popleft()


def _increase(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    total = 0.0
    prev = values[0]
    for v in values[1:]:
        total += v - prev if v >= prev else v  # a drop is a counter reset
        prev = v
    return total


def hand_evaluate(now: float, snap: Mapping[str, float | None], st: HandState) -> HandVerdict:
    """POLICY evaluated at one tick, written directly for its 20 rules."""
    get = snap.get
    p99, s_p99 = get("canary.p99"), get("stable.p99")
    p90, p50 = get("canary.p90"), get("canary.p50")
    err, s_err = get("canary.error_rate"), get("stable.error_rate")
    ok, s_ok = get("canary.success_rate"), get("stable.success_rate")
    restarts, s_restarts = get("canary.restarts"), get("stable.restarts")
    cpu, s_cpu, mem = get("canary.cpu"), get("stable.cpu"), get("canary.memory")
    rps, s_rps = get("canary.request_rate"), get("stable.request_rate")
    failed, not_ready = get("canary.failed_pods"), get("canary.not_ready_pods")
    weight, step = get("weight"), get("step")

    # Windows see every tick, whatever the conditions that use them decide.
    w = st.restarts_10m
    _push(w, now, restarts, now - 600.0)
    inc_10m = _increase([v for _, v in w])
    cut_5m = now - 300.0
    inc_5m = _increase([v for t, v in w if t > cut_5m])
    w = st.stable_restarts_10m
    _push(w, now, s_restarts, now - 600.0)
    s_inc_10m = _increase([v for _, v in w])
    times = st.p99_over_250ms_10m
    if p99 is not None and p99 > 0.25:
        times.append(now)
    while times and times[0] <= now - 600.0:
        times.popleft()
    n_slow = len(times)
    w = st.avg_p90_5m
    _push(w, now, p90, cut_5m)
    avg_p90 = sum([v for _, v in w]) / len(w) if w else None
    w = st.avg_cpu_3m
    _push(w, now, cpu, now - 180.0)
    avg_cpu = sum([v for _, v in w]) / len(w) if w else None
    w = st.max_memory_5m
    _push(w, now, mem, cut_5m)
    max_mem = max([v for _, v in w]) if w else None
    w = st.avg_success_10m
    _push(w, now, ok, now - 600.0)
    avg_ok = sum([v for _, v in w]) / len(w) if w else None
    w = st.max_p99_10m
    _push(w, now, p99, now - 600.0)
    max_p99 = max([v for _, v in w]) if w else None
    last6 = st.max_p50_last6
    last6.append(p50)
    known = [v for v in last6 if v is not None]
    max_p50 = max(known) if known else None
    last10 = st.err_over_2pc_last10
    last10.append(None if err is None else err > 0.02)
    n_err = last10.count(True)

    # Conditions in Kleene logic: None is unknown.
    c0 = None if p99 is None else p99 > 0.3
    c1 = None if err is None else err > 0.01
    a = None if p99 is None or s_p99 is None else p99 > s_p99 * 1.5
    b = None if p99 is None else p99 > 0.1
    c2 = False if a is False or b is False else None if a is None or b is None else True
    a = None if failed is None else failed > 0
    b = None if inc_5m is None else inc_5m >= 3
    c3 = True if a is True or b is True else None if a is None or b is None else False
    c4 = n_slow >= 40
    c5 = p99 is None
    a = None if weight is None else weight >= 50
    b = None if ok is None else ok >= 0.999
    c6 = False if a is False or b is False else None if a is None or b is None else True
    c7 = None if avg_p90 is None else avg_p90 > 0.2
    c8 = None if max_p50 is None else max_p50 > 0.15
    a = None if err is None or s_err is None else err > s_err * 2
    b = None if err is None else err > 0.005
    c9 = False if a is False or b is False else None if a is None or b is None else True
    c10 = None if ok is None or s_ok is None else ok < s_ok - 0.01
    c11 = None if avg_cpu is None or s_cpu is None else avg_cpu > s_cpu * 1.3 + 0.1
    c12 = None if max_mem is None else max_mem > 2 * GIB
    a = None if not_ready is None else not_ready > 1
    b = None if weight is None else not weight < 10
    c13 = False if a is False or b is False else None if a is None or b is None else True
    c14 = (
        None
        if rps is None or s_rps is None or weight is None
        else rps < s_rps * weight / 100 * 0.5
    )
    c15 = n_err >= 3
    c16 = s_p99 is None or s_err is None
    c17 = None if inc_10m is None or s_inc_10m is None else inc_10m > s_inc_10m + 2
    parts = (
        None if step is None else step >= 2,
        None if avg_ok is None else avg_ok >= 0.995,
        p99 is not None,
        None if max_p99 is None else max_p99 < 0.35,
    )
    c18 = False if False in parts else None if None in parts else True
    a = None if p99 is None or s_p99 is None else p99 > s_p99 * 1.2
    b = None if err is None else err > 0.005
    either = True if a is True or b is True else None if a is None or b is None else False
    a = None if weight is None else weight < 100
    b = None if either is None else not either
    c19 = False if a is False or b is False else None if a is None or b is None else True
    conds = (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
             c10, c11, c12, c13, c14, c15, c16, c17, c18, c19)  # fmt: skip

    # `for`: pending from the first true tick, firing once held long enough.
    pending, firing = st.pending, st.firing
    for i, c in enumerate(conds):
        if c is True:
            since = pending[i]
            if since is None:
                pending[i] = since = now
            firing[i] = now - since >= HOLDS[i]
        else:
            pending[i] = None
            firing[i] = False
    healthy = sum([1 for i in GUARDS if conds[i] is False])
    health = healthy * 100.0 / len(GUARDS)
    for i in DECISION_ORDER:
        if firing[i]:
            since = pending[i]
            true_for = None if since is None else now - since
            return HandVerdict(
                now, ACTIONS[i], LABELS[i], health, true_for, conds, tuple(pending), tuple(firing)
            )
    return HandVerdict(
        now, Action.CONTINUE, None, health, None, conds, tuple(pending), tuple(firing)
    )


# --- running and agreeing --------------------------------------------------------------


def load_policy(source: str = POLICY) -> CompiledPolicy:
    try:
        return dsl.load(source, "bench.rules")
    except dsl.PolicyError as e:
        raise BenchError(f"the benchmark policy does not load:\n{e.render()}") from None


def run_compiled(policy: CompiledPolicy, series: Series) -> list[Verdict]:
    state = policy.new_state()
    evaluate = policy.evaluate
    return [evaluate(now, snap, state) for now, snap in series]


def run_handwritten(series: Series) -> list[HandVerdict]:
    state = HandState()
    return [hand_evaluate(now, snap, state) for now, snap in series]


def run_interpreter(source: str, series: Series) -> list[OracleVerdict]:
    from tests.dsl.oracle import Oracle

    tree, diagnostics = parse(source)
    if tree is None:
        raise BenchError(f"the benchmark policy does not parse: {diagnostics}")
    oracle = Oracle(tree)
    return [oracle.step(now, snap) for now, snap in series]


def _disagree(name: str, tick: int, now: float, ours: object, theirs: object) -> BenchError:
    return BenchError(
        f"the compiled policy and {name} disagree at tick {tick} (t={now:g}s); "
        f"no honest figure can be given:\n  compiled: {ours}\n  {name}: {theirs}"
    )


def verify_handwritten(policy: CompiledPolicy, series: Series) -> None:
    """Raise BenchError unless `hand_evaluate` gives the compiled verdict at every tick."""
    compiled = run_compiled(policy, series)
    hand = run_handwritten(series)
    for i, (v, h) in enumerate(zip(compiled, hand, strict=True)):
        ours = (v.action, v.rule, v.health, v.true_for, v.conditions, v.pending_since, v.firing)
        theirs = (h.action, h.rule, h.health, h.true_for, h.conditions, h.pending_since, h.firing)
        if ours != theirs:
            raise _disagree("the hand-written function", i, v.at, ours, theirs)


def verify_interpreter(policy: CompiledPolicy, source: str, series: Series) -> None:
    """Raise BenchError unless the reference interpreter gives the compiled verdicts."""
    compiled = run_compiled(policy, series)
    reference = run_interpreter(source, series)
    for i, (v, o) in enumerate(zip(compiled, reference, strict=True)):
        ours = (v.action.value, v.rule, v.health, list(v.conditions), list(v.pending_since))
        theirs = (o.action, o.rule, o.health, o.conditions, o.pending_since)
        if ours != theirs:
            raise _disagree("the interpreter", i, v.at, ours, theirs)


def decided_share(policy: CompiledPolicy, series: Series) -> dict[str, float]:
    """The share of ticks each action decides (a check that the series exercises the rules)."""
    verdicts = run_compiled(policy, series)
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.action.value] = counts.get(v.action.value, 0) + 1
    return {a: n / len(verdicts) for a, n in sorted(counts.items())}


# --- a 1,000-rule file --------------------------------------------------------------

_LITERALS: dict[str, tuple[str, ...]] = {
    "p50": ("80ms", "120ms", "200ms"),
    "p90": ("150ms", "250ms", "400ms"),
    "p99": ("250ms", "300ms", "1s", "1.5s"),
    "error_rate": ("0.5%", "1%", "2%", "0.01"),
    "success_rate": ("99%", "99.5%", "99.9%", "0.995"),
    "request_rate": ("5", "50", "100"),
    "ready_pods": ("1", "2", "3"),
    "not_ready_pods": ("0", "1", "2"),
    "failed_pods": ("0", "1"),
    "cpu": ("0.5", "1", "2"),
    "memory": ("512Mi", "1Gi", "2Gi", "500MB"),
    "queue_depth": ("10", "100"),
    "gc_pause": ("20ms", "50ms"),
}
_DEFINITIONS = (
    'metric queue_depth = promql `sum(queue_depth{namespace="{{namespace}}",'
    ' pod=~"{{pod_regex}}"})` as count',
    "metric gc_pause = promql `max(rate(gc_pause_seconds_sum{namespace=\"{{namespace}}\","
    ' pod=~"{{pod_regex}}"}[{{window}}]))` as duration',
)
_WINDOWS = ("30s", "1m", "5m", "10m", "1h", "last 5", "last 20")
_FORS = ("30s", "1m", "2m", "5m", "1m30s", "10m")
_ACTIONS = ("rollback", "pause", "pause", "promote", "continue")
_COMPARE = (">", ">", ">=", "<", "<=")


def _atom(rng: random.Random, depth: int = 0) -> str:
    """One varied condition: a threshold, a window, a baseline, absent, not, context."""
    metric = rng.choice(list(_LITERALS))
    track = rng.choice(("", "", "canary.", "stable."))
    lit = rng.choice(_LITERALS[metric])
    op = rng.choice(_COMPARE)
    kind = rng.randrange(10 if depth == 0 else 3)
    if kind == 0:
        return f"{track}{metric} {op} {lit}"
    if kind == 1:
        func = rng.choice(("avg", "min", "max"))
        return f"{func}({track}{metric}, {rng.choice(_WINDOWS)}) {op} {lit}"
    if kind == 2:
        return f"increase({track}restarts, {rng.choice(_WINDOWS)}) >= {rng.randint(1, 5)}"
    if kind == 3:
        inner = _atom(rng, depth + 1)
        return f"count({inner}, {rng.choice(_WINDOWS)}) >= {rng.randint(2, 8)}"
    if kind == 4:
        return f"canary.{metric} > stable.{metric} * {rng.choice(('1.2', '1.5', '2'))}"
    if kind == 5:
        return f"absent({track}{metric})"
    if kind == 6:
        return f"not ({_atom(rng, depth + 1)})"
    if kind == 7:
        return rng.choice(
            ("weight >= 50", "weight < 10", "step >= 2", "elapsed > 10m", "step_elapsed < 2m")
        )
    if kind == 8:
        return f"abs(delta({track}p99, {rng.choice(_WINDOWS)})) > 50ms"
    return f"canary.{metric} - stable.{metric} > {lit}"


def _condition(rng: random.Random) -> str:
    atoms = [_atom(rng) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
    text = atoms[0]
    for atom in atoms[1:]:
        joiner = rng.choice((" and ", " and ", " or "))
        text = f"({text}){joiner}{atom}" if rng.random() < 0.2 else f"{text}{joiner}{atom}"
    return text


def make_rules_file(rules: int, seed: int = 11) -> str:
    """A policy of `rules` varied rules (with comments, blank lines and two definitions)."""
    rng = random.Random(seed)
    lines = ["# generated for the benchmark: varied rules over every metric", *_DEFINITIONS]
    for i in range(rules):
        if i % 25 == 0:
            lines += ["", f"# group {i // 25}"]
        name = f"r{i}_{rng.choice(('latency', 'errors', 'pods', 'cpu', 'memory', 'mix'))}: "
        if rng.random() < 0.1:
            name = ""  # a rule without a name is called by its line
        hold = f" for {rng.choice(_FORS)}" if rng.random() < 0.5 else ""
        lines.append(f"{name}{_condition(rng)}{hold} -> {rng.choice(_ACTIONS)}")
    return "\n".join(lines) + "\n"


# --- measuring ----------------------------------------------------------------------


def measure(variants: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[int]]:
    """CPU nanoseconds of each variant in each round; variants interleaved, order rotating."""
    names = list(variants)
    times: dict[str, list[int]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            run = variants[name]
            gc.collect()
            gc.disable()
            try:
                start = time.process_time_ns()
                run()
                elapsed = time.process_time_ns() - start
            finally:
                gc.enable()
            times[name].append(elapsed)
    return times


@dataclass(frozen=True)
class Figure:
    name: str
    ratio: float
    details: tuple[str, ...]

    @property
    def goal(self) -> float:
        return GOALS[self.name]

    @property
    def met(self) -> bool:
        return self.ratio <= self.goal


def _ratio(ours: Sequence[int], theirs: Sequence[int]) -> float:
    # The best round of each: noise on a shared machine only ever adds time.
    return min(ours) / min(theirs)


def _per_op(label: str, times: Sequence[int], ops: int, unit: str) -> str:
    scale, suffix = (1e3, "us") if unit == "us" else (1e6, "ms")
    best = min(times) / ops / scale
    median = statistics.median(times) / ops / scale
    return f"{label}: {best:.2f} {suffix}/{'tick' if unit == 'us' else 'load'} " \
        f"(median {median:.2f})"


def _paired(ours: Sequence[int], theirs: Sequence[int]) -> str:
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return f"median of per-round ratios {statistics.median(ratios):.2f}x"


def bench_eval_vs_handwritten(ticks: int = 3000, rounds: int = 15) -> Figure:
    policy = load_policy()
    series = make_series(ticks)
    verify_handwritten(policy, series)
    times = measure(
        {
            "compiled": lambda: run_compiled(policy, series),
            "hand": lambda: run_handwritten(series),
        },
        rounds,
    )
    shares = ", ".join(f"{a} {s:.0%}" for a, s in decided_share(policy, series).items())
    return Figure(
        "eval_vs_handwritten",
        _ratio(times["compiled"], times["hand"]),
        (
            _per_op("policy.evaluate", times["compiled"], ticks, "us"),
            _per_op("hand-written", times["hand"], ticks, "us"),
            f"{ticks} ticks x {rounds} rounds, {_paired(times['compiled'], times['hand'])}",
            f"verdicts: {shares}",
        ),
    )


def bench_eval_vs_interpreter(ticks: int = 3000, rounds: int = 5) -> Figure:
    policy = load_policy()
    series = make_series(ticks)
    verify_interpreter(policy, POLICY, series)
    times = measure(
        {
            "compiled": lambda: run_compiled(policy, series),
            "interpreter": lambda: run_interpreter(POLICY, series),
        },
        rounds,
    )
    return Figure(
        "eval_vs_interpreter",
        _ratio(times["compiled"], times["interpreter"]),
        (
            _per_op("policy.evaluate", times["compiled"], ticks, "us"),
            _per_op("interpreter", times["interpreter"], ticks, "us"),
            f"{ticks} ticks x {rounds} rounds, "
            f"{_paired(times['compiled'], times['interpreter'])}",
        ),
    )


def bench_compile_vs_parse(rules: int = 1000, rounds: int = 7) -> Figure:
    text = make_rules_file(rules)
    policy = load_policy(text)  # also warms the cached parser
    if len(policy.rules) != rules:
        raise BenchError(f"the generated file has {len(policy.rules)} rules, not {rules}")
    bare = bare_parser()
    bare.parse(text)
    times = measure(
        {
            "load": lambda: dsl.load(text, "bench.rules"),
            "ready": lambda: dsl.load(text, "bench.rules").prepare(),
            "bare": lambda: bare.parse(text),
        },
        rounds,
    )
    size = f"{len(text.splitlines())} lines, {len(text) / 1024:.0f} KiB"
    # `dsl.load` parses, checks and generates the evaluator's code; Python compiles
    # that code to bytecode at the first evaluation. Both figures are shown.
    return Figure(
        "compile_vs_parse",
        _ratio(times["load"], times["bare"]),
        (
            _per_op("dsl.load", times["load"], 1, "ms"),
            _per_op("dsl.load + bytecode (prepare)", times["ready"], 1, "ms"),
            _per_op("lark bare parse", times["bare"], 1, "ms"),
            f"with the bytecode compiled too: {_ratio(times['ready'], times['bare']):.2f}x",
            f"{rules} rules ({size}) x {rounds} rounds, {_paired(times['load'], times['bare'])}",
        ),
    )


def report(figures: Iterable[Figure]) -> list[str]:
    """The printed lines: one per figure with its details, then a note per missed goal."""
    figures = list(figures)
    lines: list[str] = []
    for f in figures:
        lines.append(f"{f.name} {f.ratio:.2f}x")
        lines += [f"    {d}" for d in f.details]
    lines += [f"{f.name}: goal <= {f.goal:g}x: missed" for f in figures if not f.met]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ticks", type=int, default=3000, help="ticks of the series")
    parser.add_argument("--rules", type=int, default=1000, help="rules of the generated file")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the evaluation figure")
    parser.add_argument(
        "--only", action="append", choices=list(GOALS), help="run only this figure (repeatable)"
    )
    args = parser.parse_args(argv)
    if min(args.ticks, args.rules, args.rounds) < 1:
        parser.error("--ticks, --rules and --rounds must be positive")
    # The slower figures get fewer rounds: each of their rounds is long and steady.
    runs: dict[str, Callable[[], Figure]] = {
        "eval_vs_handwritten": lambda: bench_eval_vs_handwritten(args.ticks, args.rounds),
        "eval_vs_interpreter": lambda: bench_eval_vs_interpreter(
            args.ticks, max(3, args.rounds // 3)
        ),
        "compile_vs_parse": lambda: bench_compile_vs_parse(args.rules, max(3, args.rounds // 2)),
    }
    figures = []
    try:
        for name, run in runs.items():
            if not args.only or name in args.only:
                figures.append(run())
    except BenchError as e:
        print(f"bench/dsl.py: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
