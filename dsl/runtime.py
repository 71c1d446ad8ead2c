"""The evaluator runtime: what a compiled policy hands back at every tick.

In: a `Snapshot` (metric and context values at time `now`, `None` for
unknown) and the policy's `PolicyState`. Out: a `Verdict`.

Values are three-valued: a number or boolean, or `None` for unknown.
`PolicyState` holds everything that carries from one tick to the next: the
windows of `avg`/`count`/... calls and each rule's `pending_since`. The
evaluator advances the state it is handed in place (a window is a deque; a
copy per tick would cost O(window) for nothing) and touches nothing else: no
clock, no I/O, so the same series give the same verdicts in `codedance test`,
the REPL, a backtest and the live loop. `PolicyState.copy()` gives an
independent state when a caller wants to branch (the REPL's undo, a what-if).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dsl.ast import Action

Value = float | bool | None
# Keys are `track.metric` (`canary.p99`, `stable.error_rate`) for metrics and
# the bare name (`weight`, `step`, `elapsed`, `step_elapsed`) for context values.
Snapshot = Mapping[str, float | None]

RuleState = Literal["inactive", "pending", "firing"]


@dataclass(frozen=True, slots=True)
class RuleStatus:
    """One rule at one tick, as the trace and the REPL show it."""

    rule: str
    action: Action
    state: RuleState
    condition: bool | None
    pending_since: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision of one tick.

    `action` is that of the highest-priority firing rule, or `continue` when
    none fires; `rule` is the deciding rule's label (None when none fires);
    `values` are the (expression, value) pairs the deciding rule saw, as
    text; `true_for` is how long its condition has held; `health` is the share
    (0-100) of rollback and pause rules whose condition is false.

    The per-rule trace is kept as three tuples and turned into `RuleStatus`
    objects only when asked for (`rules`), which keeps the tick cheap.
    """

    at: float
    action: Action
    rule: str | None
    health: float
    true_for: float | None
    conditions: tuple[bool | None, ...]
    pending_since: tuple[float | None, ...]
    firing: tuple[bool, ...]
    rule_info: tuple[tuple[str, Action], ...] = field(repr=False)
    # Explaining costs more than evaluating, and most verdicts are never read in
    # full (a backtest, `codedance test`), so the text is made on first use.
    because: Callable[[], tuple[tuple[tuple[str, str], ...], str]] | None = field(
        default=None, repr=False, compare=False
    )
    _memo: list[tuple[tuple[tuple[str, str], ...], str]] = field(
        default_factory=list, repr=False, compare=False
    )

    def _explained(self) -> tuple[tuple[tuple[str, str], ...], str]:
        if not self._memo:
            self._memo.append(
                self.because() if self.because is not None else ((), "continue: no rule fires")
            )
        return self._memo[0]

    @property
    def explanation(self) -> str:
        return self._explained()[1]

    @property
    def values(self) -> tuple[tuple[str, str], ...]:
        return self._explained()[0]

    @property
    def rules(self) -> tuple[RuleStatus, ...]:
        out = []
        for (label, action), cond, since, firing in zip(
            self.rule_info, self.conditions, self.pending_since, self.firing, strict=True
        ):
            state: RuleState = "inactive" if since is None else "firing" if firing else "pending"
            out.append(RuleStatus(label, action, state, cond, since))
        return tuple(out)

    def trace(self) -> str:
        """Every rule's state, one per line, for test failures and the REPL."""
        from dsl.units import format_duration

        lines = []
        for r in self.rules:
            cond = {True: "true", False: "false", None: "unknown"}[r.condition]
            state: str = r.state
            if r.pending_since is not None:
                held = format_duration(self.at - r.pending_since)
                state += f" (true for {held}, since t={format_duration(r.pending_since)})"
            lines.append(f"{r.rule} -> {r.action.value}: condition {cond}, {state}")
        return "\n".join(lines)


class Window:
    """The (time, value) history of one windowed call's argument."""

    __slots__ = ("items", "last_n", "seconds")

    def __init__(self, seconds: float | None, last_n: int | None) -> None:
        self.seconds = seconds
        self.last_n = last_n
        self.items: deque[tuple[float, Any]] = deque(maxlen=last_n)

    def push(self, now: float, value: Any) -> None:
        items = self.items
        items.append((now, value))
        if self.seconds is not None:
            cutoff = now - self.seconds
            while items and items[0][0] <= cutoff:
                items.popleft()


@dataclass(slots=True)
class PolicyState:
    """What a policy remembers between ticks; advanced in place by `evaluate`."""

    windows: list[Window]
    pending_since: list[float | None]
    firing: list[bool]
    # The latest value of each window's aggregate, kept for explanations.
    window_values: list[Value] = field(default_factory=list)
    last_tick: float | None = None

    def copy(self) -> PolicyState:
        return copy.deepcopy(self)
