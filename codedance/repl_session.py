"""The REPL's session: lines typed in, text out, with no terminal involved.

`Session.feed(line)` takes one line and returns what to print (empty while an
entry continues on the next line: `Session.prompt` is then `... `). An entry
is one of:

- a command: `:tick`, `:advance 2m`, `:series canary.p99 0.1x3 0.5x10`, ...
  (`repl_commands.COMMANDS` lists them with their help);
- a value: `canary.p99 = 350ms`, `p99 = 0.35` (a plain number is in base
  units), `weight = 25`, `stable.p99 = canary.p99 * 0.8`, `p99 = _` (unknown);
- a rule or metric definition, which joins the session's policy, replacing
  the statement of the same name if there is one;
- any other text is an expression, evaluated now and printed with its unit.

The policy. Loaded files are read as one policy, in order, followed by the
statements typed at the prompt (a typed statement named like one of a file
takes its place; `repl_policy` composes the text). Whenever the policy
changes, the session replays its past evaluations through the new policy, so
the verdicts it shows, `:explain` and `:save` always agree with what
`codedance test` would say.

Time. Evaluations happen at t = 0, i, 2i, ... (i is `:interval`, 1m by
default, as in a test file); `:tick` runs the next one and `:advance d`
every one due in the next d. A value typed with `=` holds from now on; a
`:series` starts at the next evaluation (`repl_values`). Each evaluation
records the snapshot the policy saw; `:save` (`repl_save`) writes those
snapshots as the input series of a test file in the format of LANGUAGE.md
section 8, with expectations pinning the verdicts, so an exploration becomes
a regression test.

This module holds the session's state and its core: reading entries,
dispatching commands, the policy and the clock. What an entry does lives
beside it: `repl_expressions` (expressions), `repl_values` (values and
series), `repl_explain` (`:explain`, `:rules`, evaluations as text),
`repl_save` (`:save`) and `repl_prometheus` (`:query`, `:pull`). Every
problem is a diagnostic (path `<repl>` for typed text) or a one-line message;
`Session.feed` never raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import dsl
from codedance import repl_explain, repl_prometheus, repl_save, repl_values
from codedance.repl_commands import COMMANDS, HELP, ReplError, duration, words
from codedance.repl_expressions import check, name_key, state_after, strip_comment, value_text
from codedance.repl_policy import StatementKey, add_statements, compose, load_files, render_typed
from codedance.repl_values import ASSIGN, UNKNOWN_WORDS, Input, Tick, snapshot_at
from dsl import ast
from dsl.ast import Dim
from dsl.builtins import CONTEXT, METRICS
from dsl.compile import CompiledPolicy
from dsl.parser import parse
from dsl.runtime import PolicyState
from dsl.units import closest, format_duration

if TYPE_CHECKING:
    from adapters.metrics.prometheus import SyncPrometheus

PROMPT = ">>> "
CONTINUATION = "... "
DEFAULT_INTERVAL = 60.0  # a test file's default evaluation_interval
MAX_TICKS = 100_000  # evaluations one command may run
_HORIZON = 1e-9  # relative tolerance when a time lands on a tick


class Session:
    """A REPL session over a policy; see the module docstring for what it understands.

        session = Session()
        print(session.load(["checkout.rules"]))
        session.feed(":series canary.p99 0.1x2 0.5x10")
        print(session.feed(":advance 2m30s"))

    `prometheus`, `rollout` (namespace and stable workload) and `canary` serve
    `:query` and `:pull`; `clock` is the wall clock their ranges end at.
    `failures` counts the entries that failed, `finished` turns true at `:quit`.
    """

    def __init__(
        self,
        *,
        prometheus: SyncPrometheus | None = None,
        rollout: tuple[str, str] | None = None,
        canary: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prometheus = prometheus
        self.rollout = rollout
        self.canary = canary
        self.clock = clock
        self.interval = DEFAULT_INTERVAL
        self.finished = False
        self.failures = 0
        self.files: list[tuple[str, str]] = []
        self.typed: list[tuple[StatementKey | None, str]] = []
        self.inputs: dict[str, Input] = {}
        self.ticks: list[Tick] = []
        self.now = 0.0
        self.composed = compose([], [])
        self.policy: CompiledPolicy = dsl.load("", "<session>")
        self.state: PolicyState = self.policy.new_state()
        self.saved: set[str] = set()  # real paths `:save` wrote, which it may write again
        self._pending = ""

    # --- input ------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        return CONTINUATION if self._pending else PROMPT

    def feed(self, line: str) -> str:
        """One line typed; the text to print (empty while the entry continues)."""
        if self._pending:
            if not line.strip():  # an empty line ends an unfinished entry
                return self.flush()
            entry = f"{self._pending} {line.strip()}"
        else:
            entry = line
        if self.needs_more(entry):
            self._pending = entry
            return ""
        self._pending = ""
        return self._run(entry)

    def flush(self) -> str:
        """Run an unfinished entry as it is (at the end of the input)."""
        entry, self._pending = self._pending, ""
        return self._run(entry) if entry else ""

    def run(self, text: str) -> str:
        """Several lines at once (a pasted block, or an entry and its continuation lines)."""
        outputs = [self.feed(line) for line in text.splitlines()]
        outputs.append(self.flush())
        return "\n".join(o for o in outputs if o)

    def incomplete(self, text: str) -> bool:
        """Whether these lines, fed one by one, would leave an entry unfinished."""
        pending = ""
        for line in text.split("\n"):  # a last empty line (Enter twice) ends the entry
            if pending and not line.strip():
                return False
            entry = f"{pending} {line.strip()}" if pending else line
            pending = entry if self.needs_more(entry) else ""
        return bool(pending)

    def needs_more(self, entry: str) -> bool:
        """An entry that ends too early: an open `(`, or a trailing operator, `->` or `for`.

        The parser says so with E002 ("the input ends too early"); to tell `p99 >
        300ms` (a whole expression, though not a whole rule) from `p99 > 300ms and`,
        the text is also parsed as an expression, and is unfinished only when that
        also stops at its end.
        """
        text = entry.strip()
        if not text or text.startswith((":", "#")):
            return False
        m = ASSIGN.fullmatch(text)
        if m is not None:
            text = m.group("rhs").strip()
            if not text or text in UNKNOWN_WORDS:
                return False
        text = strip_comment(text)
        _, diagnostics = parse(text)
        if not any(d.code == "E002" for d in diagnostics):
            return False
        _, as_expression = parse(f"{text} -> continue")
        return any(d.span.start >= len(text) for d in as_expression)

    def load(self, paths: Sequence[str]) -> str:
        """Read policy files into the session; the text to print (errors included)."""
        return self._guard(lambda: load_files(self, list(paths)))

    def _run(self, entry: str) -> str:
        return self._guard(lambda: self._dispatch(entry.strip()))

    def _guard(self, action: Callable[[], str]) -> str:
        # The loop boundary: whatever happens, the person sees a reason, not a traceback.
        try:
            return action()
        except ReplError as e:
            self.failures += 1
            return str(e)
        except Exception as e:
            self.failures += 1
            reason = (str(e).splitlines() or [""])[0][:200]
            return f"error: {type(e).__name__}: {reason}".rstrip(": ")

    def _dispatch(self, entry: str) -> str:
        if not entry or entry.startswith("#"):
            return ""
        if entry.startswith(":"):
            name, _, args = entry.partition(" ")
            handler = self._commands().get(name)
            if handler is None:
                hint = closest(name, tuple(COMMANDS))
                mean = f"; did you mean `{hint}`?" if hint else ""
                raise ReplError(f"unknown command `{name}`{mean} (`:help` lists the commands)")
            return handler(args.strip())
        m = ASSIGN.fullmatch(entry)
        if m is not None:
            return repl_values.assign(self, entry, m)
        return self._policy_text(entry)

    def _commands(self) -> dict[str, Callable[[str], str]]:
        return {
            ":tick": self._tick_command,
            ":advance": self._advance,
            ":series": lambda args: repl_values.series(self, args),
            ":interval": self._interval,
            ":explain": lambda args: repl_explain.explain(self, args.strip()),
            ":rules": self._rules,
            ":values": lambda args: repl_values.values_text(self),
            ":load": lambda args: load_files(self, words(args)),
            ":save": lambda args: repl_save.save(self, args),
            ":reset": self._reset,
            ":query": lambda args: repl_prometheus.query(self, args),
            ":pull": lambda args: repl_prometheus.pull(self, args),
            ":help": lambda args: HELP,
            ":quit": self._quit,
            ":exit": self._quit,
        }

    # --- names, for completion -------------------------------------------------

    def metric_names(self) -> list[str]:
        defined = [d.name for d in self.policy.checked.definitions]
        return [*METRICS, *defined]

    def rule_labels(self) -> list[str]:
        return [r.label for r in self.policy.rules]

    def metric_dim(self, name: str) -> Dim | None:
        if name in CONTEXT:
            return CONTEXT[name].dim
        return self.policy.checked.metric_dims.get(name)

    # --- expressions, against the session's policy and values -------------------

    def expression(
        self, text: str, entry: str | None = None, offset: int = 0
    ) -> tuple[CompiledPolicy, ast.Expr]:
        """`text` checked as an expression of this policy (see `repl_expressions.check`)."""
        return check(self.policy, self.composed.text, text, entry, offset)

    def key(self, text: str, entry: str | None = None, offset: int = 0) -> tuple[str, Dim]:
        """The snapshot key and kind of a metric or context name (`p99` -> canary.p99)."""
        return name_key(self.policy, self.composed.text, text, entry, offset)

    def what_if(self, policy: CompiledPolicy) -> tuple[dict[str, float | None], PolicyState]:
        """What a policy sees now, and its state after an evaluation now, after the past ones."""
        snapshot = self._snapshot(self.now)
        return snapshot, state_after(policy, self.ticks, self.now, snapshot)

    def _snapshot(self, t: float) -> dict[str, float | None]:
        return snapshot_at(self.policy.metric_keys, self.inputs, self.interval, t)

    # --- the policy -------------------------------------------------------------

    def _policy_text(self, entry: str) -> str:
        """A rule or a metric definition to add, or an expression to evaluate."""
        tree, diagnostics = parse(entry)
        if tree is not None:
            return add_statements(self, entry, tree)
        if "->" in entry or entry.startswith("metric "):
            raise ReplError(render_typed(diagnostics, entry))
        text = strip_comment(entry)
        as_rule, _ = parse(f"{text} -> continue")
        if as_rule is not None and any(r.name or r.for_ for r in as_rule.rules):
            raise ReplError(render_typed(diagnostics, entry))  # a rule without its action
        scratch, node = self.expression(text)
        snapshot, state = self.what_if(scratch)
        return value_text(scratch, node, snapshot, state)

    def _rules(self, args: str) -> str:
        return repl_explain.rules_text(self)

    # --- time -------------------------------------------------------------------

    def next_time(self) -> float:
        """When the next evaluation runs."""
        return len(self.ticks) * self.interval

    def _evaluate_next(self) -> Tick:
        t = self.next_time()
        snapshot = self._snapshot(t)
        verdict = self.policy.evaluate(t, snapshot, self.state)
        tick = Tick(t, snapshot, verdict)
        self.ticks.append(tick)
        self.now = t
        return tick

    def _tick_command(self, args: str) -> str:
        n = 1
        if args:
            if not args.isdigit() or not 0 < int(args) <= MAX_TICKS:
                raise ReplError(f"`:tick {args}`: write a number from 1 to {MAX_TICKS}")
            n = int(args)
        ticks = [self._evaluate_next() for _ in range(n)]
        return repl_explain.report(self.ticks, len(ticks))

    def _advance(self, args: str) -> str:
        if not args:
            raise ReplError("write `:advance DURATION`, such as `:advance 2m`")
        target = self.now + duration(args, "a duration")
        due = math.floor(target / self.interval + _HORIZON * max(1.0, target / self.interval))
        due_count = due + 1 - len(self.ticks)
        if due_count > MAX_TICKS:
            raise ReplError(
                f"that is {due_count} evaluations every {format_duration(self.interval)}; "
                f"advance at most {MAX_TICKS} at a time"
            )
        ticks = [self._evaluate_next() for _ in range(max(0, due_count))]
        # land on the last evaluation when the target is that tick, give or take rounding
        if not ticks or target - ticks[-1].at > _HORIZON * max(1.0, target):
            self.now = target
        if not ticks:
            return (
                f"t={format_duration(self.now)}: no evaluation due "
                f"(the next is at t={format_duration(self.next_time())})"
            )
        return repl_explain.report(self.ticks, len(ticks))

    def _interval(self, args: str) -> str:
        if not args:
            return f"evaluations every {format_duration(self.interval)}; series samples as often"
        seconds = duration(args, "an interval")
        if seconds < 0.001 or seconds > 86400:
            raise ReplError("the interval must be from 1ms to 1d")
        if self.ticks:
            raise ReplError(
                f"the interval cannot change once time has run (t={format_duration(self.now)}); "
                "`:reset` starts over and keeps the rules"
            )
        self.interval = seconds
        return f"evaluations every {format_duration(seconds)}; series samples as often"

    def _reset(self, args: str) -> str:
        self.ticks, self.inputs, self.now = [], {}, 0.0
        self.state = self.policy.new_state()
        return "back at t=0s: values, series and evaluations forgotten; the rules stay"

    def _quit(self, args: str) -> str:
        self.finished = True
        return ""
