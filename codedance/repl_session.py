"""The REPL's session: lines typed in, text out, with no terminal involved.

`Session.feed(line)` takes one line and returns what to print (empty while an
entry continues on the next line: `Session.prompt` is then `... `). An entry
is one of:

- a command: `:tick`, `:advance 2m`, `:series canary.p99 0.1x3 0.5x10`, ...
  (`COMMANDS` lists them with their help);
- a value: `canary.p99 = 350ms`, `p99 = 0.35` (a plain number is in base
  units), `weight = 25`, `stable.p99 = canary.p99 * 0.8`, `p99 = _` (unknown);
- a rule or metric definition, which joins the session's policy, replacing
  the statement of the same name if there is one;
- any other text is an expression, evaluated now and printed with its unit.

The policy. Loaded files are read as one policy, in order, followed by the
statements typed at the prompt (a typed statement named like one of a file
takes its place). Whenever the policy changes, the session replays its past
evaluations through the new policy, so the verdicts it shows, `:explain` and
`:save` always agree with what `codedance test` would say.

Time. Evaluations happen at t = 0, i, 2i, ... (i is `:interval`, 1m by
default, as in a test file); `:tick` runs the next one and `:advance d`
every one due in the next d. A value typed with `=` holds from now on; a
`:series` starts at the next evaluation, its samples spaced by the interval
(before that, its first sample stands). Each evaluation records the snapshot
the policy saw; `:save` writes those snapshots as the input series of a test
file in the format of LANGUAGE.md section 8, with expectations pinning the
verdicts, so an exploration becomes a regression test.

Expressions are evaluated as if an evaluation ran now with the current
values, after the past evaluations: windows (`avg(p99, 5m)`) are computed
over the session's history. Every problem is a diagnostic (path `<repl>`
for typed text) or a one-line message; `Session.feed` never raises.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import dsl
from codedance.policy_files import FileProblem, UsageError, find_files, read_text
from dsl import ast
from dsl.ast import Dim, Span
from dsl.builtins import CONTEXT, METRICS
from dsl.check import key_of
from dsl.compile import CompiledPolicy, CompiledRule
from dsl.diagnostics import Diagnostic, LineIndex, render
from dsl.explain import explain_tree, show, value_of
from dsl.parser import parse
from dsl.runtime import PolicyState, RuleStatus, Verdict
from dsl.series import SeriesError, parse_series, value_at
from dsl.units import UnitError, closest, format_duration, format_value, parse_quantity

if TYPE_CHECKING:
    from adapters.metrics.prometheus import SyncPrometheus
    from engine.ports import Target

PROMPT = ">>> "
CONTINUATION = "... "
DEFAULT_INTERVAL = 60.0  # a test file's default evaluation_interval
MAX_TICKS = 100_000  # evaluations one command may run
MAX_PULL_SAMPLES = 11_000  # Prometheus refuses longer ranges
_HORIZON = 1e-9  # relative tolerance when a time lands on a tick

COMMANDS: dict[str, str] = {
    ":tick": ":tick [N]            run the next evaluation (or the next N)",
    ":advance": ":advance DURATION    run every evaluation due in the next DURATION",
    ":series": ":series KEY VALUES   a series in promtool notation, from the next evaluation",
    ":interval": ":interval DURATION  time between evaluations and between series samples",
    ":explain": ":explain [RULE]      every sub-expression of a rule with its value",
    ":rules": ":rules               the session's rules and their state",
    ":values": ":values              the values and series set so far",
    ":load": ":load [FILE...]      (re-)read policy files; alone, re-read the loaded ones",
    ":save": ":save FILE           write a test file pinning this session's verdicts",
    ":reset": ":reset               back to t=0: forget values, series and evaluations",
    ":query": ":query PROMQL         an instant query against --prometheus",
    ":pull": ":pull KEY RANGE       a range of a metric from --prometheus, as its series",
    ":help": ":help                this text",
    ":quit": ":quit                leave (Ctrl-D too)",
}

_ASSIGN = re.compile(
    r"\s*(?P<lhs>[A-Za-z_][A-Za-z0-9_]*(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)?)\s*=(?!=)\s*(?P<rhs>.*)",
    re.DOTALL,
)
_UNKNOWN_WORDS = frozenset({"_", "unknown", "stale"})
_EXAMPLES = {
    Dim.DURATION: "a duration such as 350ms",
    Dim.RATIO: "a percentage such as 1.5% (or a ratio such as 0.015)",
    Dim.BYTES: "a size such as 512Mi",
    Dim.RATE: "a number of requests per second such as 50",
    Dim.COUNT: "a count such as 3",
    Dim.CORES: "a number of cores such as 0.5",
    Dim.NUMBER: "a plain number such as 25",
    Dim.BOOL: "a value",
}


class ReplError(Exception):
    """A problem with one entry; its text (one line, or diagnostics) is shown as it is."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Constant:
    """A value typed with `=`: it holds from now on (None is unknown)."""

    value: float | None

    def at(self, t: float, interval: float) -> float | None:
        return self.value

    def describe(self, dim: Dim) -> str:
        return "set with `=`"


@dataclass(frozen=True, slots=True)
class SeriesInput:
    """Samples spaced by the interval, the first standing at `start` (and before it)."""

    samples: tuple[float | None, ...]
    start: float
    origin: str

    def at(self, t: float, interval: float) -> float | None:
        return value_at(self.samples, interval, max(0.0, t - self.start))

    def describe(self, dim: Dim) -> str:
        return f"{len(self.samples)} samples from t={format_duration(self.start)} ({self.origin})"


Input = Constant | SeriesInput


@dataclass(slots=True)
class Tick:
    """One evaluation: when, what the policy saw, and its verdict."""

    at: float
    snapshot: dict[str, float | None]
    verdict: Verdict


# ---------------------------------------------------------------- the session's policy


StatementKey = tuple[str, str]  # ("rule" | "metric", name)


def statement_key(statement: ast.Statement) -> StatementKey | None:
    if isinstance(statement, ast.MetricDef):
        return ("metric", statement.name)
    return ("rule", statement.name) if statement.name is not None else None


@dataclass(frozen=True, slots=True)
class _Piece:
    """A stretch of the composed policy text and where it was written."""

    start: int
    length: int
    origin: str  # a file's path, or <repl>
    source: str  # the whole text of that origin
    offset: int  # where the stretch starts in `source`


@dataclass(frozen=True, slots=True)
class Composed:
    """The session's policy text, made of the files and the typed statements."""

    text: str
    pieces: tuple[_Piece, ...]

    def piece_at(self, offset: int) -> _Piece | None:
        for p in self.pieces:
            if p.start <= offset < p.start + p.length:
                return p
        return None

    def render(self, diag: Diagnostic) -> str:
        """A diagnostic pointing into the file or the typed line it comes from."""
        p = self.piece_at(diag.span.start) or self.piece_at(max(0, diag.span.start - 1))
        if p is None:
            return render(diag, self.text, "<session>")
        shift = p.offset - p.start
        moved = replace(diag, span=Span(diag.span.start + shift, diag.span.end + shift))
        return render(moved, p.source, p.origin)

    def origin_of(self, offset: int) -> str:
        p = self.piece_at(offset)
        if p is None or p.origin == "<repl>":
            return "<repl>"
        line = LineIndex(p.source).position(offset - p.start + p.offset)[0]
        return f"{p.origin}:{line}"


def compose(
    files: Sequence[tuple[str, str]], typed: Sequence[tuple[StatementKey | None, str]]
) -> Composed:
    """Files in order, each typed statement in place of the one of its name, the rest after."""
    targets: dict[StatementKey, tuple[int, Span]] = {}
    for i, (_, text) in enumerate(files):
        tree, _ = parse(text)
        for s in tree.statements if tree is not None else ():
            key = statement_key(s)
            if key is not None:
                targets.setdefault(key, (i, s.span))
    replacements: dict[int, list[tuple[Span, str]]] = {}
    appended: list[str] = []
    for key, text in typed:
        if key is not None and key in targets:
            i, span = targets[key]
            replacements.setdefault(i, []).append((span, text))
        else:
            appended.append(text)
    pieces: list[_Piece] = []
    out: list[str] = []

    def add(text: str, origin: str, source: str, offset: int) -> None:
        if text:
            pieces.append(_Piece(sum(map(len, out)), len(text), origin, source, offset))
            out.append(text)

    for i, (path, text) in enumerate(files):
        cursor = 0
        for span, new in sorted(replacements.get(i, []), key=lambda r: r[0].start):
            add(text[cursor : span.start], path, text, cursor)
            add(new, "<repl>", new, 0)
            cursor = span.end
        add(text[cursor:], path, text, cursor)
        if text and not text.endswith("\n"):
            add("\n", path, text, len(text))
    for new in appended:
        add(new + "\n", "<repl>", new, 0)
    return Composed("".join(out), tuple(pieces))


def _render_all(diagnostics: Iterable[Diagnostic], source: str, shift: int = 0) -> str:
    index = LineIndex(source)
    out = []
    for d in diagnostics:
        if shift:
            d = replace(d, span=Span(max(0, d.span.start + shift), max(0, d.span.end + shift)))
        out.append(render(d, source, "<repl>", index))
    return "\n".join(out)


def _duration(text: str, what: str) -> float:
    """A positive duration written like a literal of the language (`30s`, `1m30s`)."""
    example = f"write {what} such as 30s or 2m"
    try:
        seconds, dim, _ = parse_quantity(text)
    except UnitError as e:
        said = e.message if text[:1].isdigit() else f"`{text}` is not a duration"
        raise ReplError(f"{said}; {example}") from None
    if dim is not Dim.DURATION or seconds <= 0:
        raise ReplError(f"`{text}` is not a positive duration; {example}")
    return seconds


def _duration_text(seconds: float) -> str:
    """`2m30s` when it reads back as the same time, else exact seconds."""
    text = format_duration(seconds)
    back = parse_quantity(text)[0]
    if abs(back - seconds) <= _HORIZON * max(1.0, seconds):
        return text
    return f"{seconds!r}s"


def _number_text(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def series_text(values: Sequence[float | None]) -> str:
    """Samples in promtool notation: `0.1x2 0.5x10 _`."""
    parts = []
    for value, run in itertools.groupby(values):
        n = len(list(run))
        word = "_" if value is None else _number_text(value)
        parts.append(word if n == 1 else f"{word}x{n - 1}")
    return " ".join(parts)


# ---------------------------------------------------------------- the session


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
        self._pending = ""
        self._saved: set[str] = set()

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
        m = _ASSIGN.fullmatch(text)
        if m is not None:
            text = m.group("rhs").strip()
            if not text or text in _UNKNOWN_WORDS:
                return False
        text = _strip_comment(text)
        _, diagnostics = parse(text)
        if not any(d.code == "E002" for d in diagnostics):
            return False
        _, as_expression = parse(f"{text} -> continue")
        return any(d.span.start >= len(text) for d in as_expression)

    def load(self, paths: Sequence[str]) -> str:
        """Read policy files into the session; the text to print (errors included)."""
        return self._guard(lambda: self._load(list(paths)))

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
        m = _ASSIGN.fullmatch(entry)
        if m is not None:
            return self._assign(entry, m)
        return self._policy_text(entry)

    def _commands(self) -> dict[str, Callable[[str], str]]:
        return {
            ":tick": self._tick_command,
            ":advance": self._advance,
            ":series": self._series,
            ":interval": self._interval,
            ":explain": self._explain,
            ":rules": self._rules,
            ":values": self._values,
            ":load": lambda args: self._load(_words(args)),
            ":save": self._save,
            ":reset": self._reset,
            ":query": self._query,
            ":pull": self._pull,
            ":help": lambda args: _HELP,
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

    # --- the policy -------------------------------------------------------------

    def _install(
        self, files: list[tuple[str, str]], typed: list[tuple[StatementKey | None, str]]
    ) -> None:
        """Make these files and statements the session's policy and replay the evaluations."""
        composed = compose(files, typed)
        try:
            policy = dsl.load(composed.text, "<session>")
        except dsl.PolicyError as e:
            raise ReplError("\n".join(composed.render(d) for d in e.diagnostics)) from None
        self.files, self.typed, self.composed, self.policy = files, typed, composed, policy
        self.state = policy.new_state()
        for tick in self.ticks:
            tick.verdict = policy.evaluate(tick.at, tick.snapshot, self.state)

    def _load(self, paths: list[str]) -> str:
        if not paths:
            paths = [p for p, _ in self.files]
            if not paths:
                raise ReplError("no file is loaded yet: `:load FILE`")
        try:
            found = find_files(paths, "*.rules", lambda _: True, "policy file")
            texts = [(p, read_text(p)) for p in found]
        except (UsageError, FileProblem) as e:
            raise ReplError(f"{e}; the session keeps its rules") from None
        errors = []
        for path, text in texts:
            try:
                dsl.load(text, path)
            except dsl.PolicyError as e:
                errors.append(e.render())
        if errors:
            raise ReplError("\n".join(errors) + "\nthe session keeps its rules")
        files = list(self.files)
        lines = []
        for path, text in texts:
            real = os.path.realpath(path)
            same = [i for i, (p, _) in enumerate(files) if os.path.realpath(p) == real]
            if same:
                files[same[0]] = (path, text)
            else:
                files.append((path, text))
            tree, _ = parse(text)
            labels = [r.label for r in tree.rules] if tree is not None else []
            verb = "re-read" if same else "loaded"
            lines.append(f"{verb} {path}: {_count(len(labels), 'rule')} ({', '.join(labels)})")
        self._install(files, self.typed)
        return "\n".join(lines + self._replayed())

    def _replayed(self) -> list[str]:
        if not self.ticks:
            return []
        last = self.ticks[-1]
        return [
            f"replayed {_count(len(self.ticks), 'evaluation')}; "
            f"t={format_duration(last.at)}: {last.verdict.explanation}"
        ]

    def _policy_text(self, entry: str) -> str:
        """A rule or a metric definition to add, or an expression to evaluate."""
        tree, diagnostics = parse(entry)
        if tree is not None:
            return "\n".join(self._statement(entry, s) for s in tree.statements)
        if "->" in entry or entry.startswith("metric "):
            raise ReplError(_render_all(diagnostics, entry))
        text = _strip_comment(entry)
        as_rule, _ = parse(f"{text} -> continue")
        if as_rule is not None and any(r.name or r.for_ for r in as_rule.rules):
            raise ReplError(_render_all(diagnostics, entry))  # a rule without its action
        return self._evaluate(text)

    def _statement(self, entry: str, statement: ast.Statement) -> str:
        text = entry[statement.span.start : statement.span.end]
        key = statement_key(statement)
        known = key is not None and any(
            statement_key(s) == key for s in self.policy.checked.policy.statements
        )
        typed = list(self.typed)
        at = next((i for i, (k, _) in enumerate(typed) if key is not None and k == key), None)
        if at is None:
            typed.append((key, text))
        else:
            typed[at] = (key, text)
        self._install(self.files, typed)
        verb = "replaced" if known else "added"
        if isinstance(statement, ast.MetricDef):
            said = f"{'redefined' if known else 'defined'} metric {statement.name}"
        else:
            rule = self._typed_rule(key, text)
            said = f"{verb} rule {rule.label} (-> {rule.action.value})"
        return "\n".join([said, *self._replayed()])

    def _typed_rule(self, key: StatementKey | None, text: str) -> CompiledRule:
        if key is not None:
            return next(r for r in self.policy.rules if r.label == key[1])
        # an unnamed rule is the last typed piece with this text: its label is `line N`
        for r in reversed(self.policy.rules):
            piece = self.composed.piece_at(r.node.span.start)
            if piece is not None and piece.origin == "<repl>" and piece.source == text:
                return r
        raise ReplError("the rule was added but cannot be found")  # pragma: no cover

    # --- expressions ------------------------------------------------------------

    def _expression(self, text: str, entry: str | None = None, offset: int = 0) -> tuple[
        CompiledPolicy, ast.Expr
    ]:
        """Check `text` as an expression of this policy; (a policy holding it, its node).

        It is checked as the condition of a rule, `TEXT -> continue`, by the real
        parser and checker. A value that is not a condition is checked again as
        `(TEXT) >= 0`, which holds for every kind of number.
        """
        shown = entry if entry is not None else text
        tree, diagnostics = parse(f"{text} -> continue")
        if tree is None:
            if any(d.span.start >= len(text) for d in diagnostics):
                # the text itself ends too early: say so, not what the added `->` met
                diagnostics = parse(text)[1]
            raise ReplError(_render_all(diagnostics, shown, offset))
        if len(tree.statements) != 1 or not tree.rules:
            raise ReplError(f"`{text}` is not one expression")
        condition = tree.rules[0].condition.span
        prefix = "".join(
            self.composed.text[d.span.start : d.span.end] + "\n"
            for d in self.policy.checked.definitions
        )
        try:
            scratch = dsl.load(f"{prefix}{text} -> continue", "<repl>")
            return scratch, scratch.rules[0].node.condition
        except dsl.PolicyError as e:
            problems = [
                d
                for d in e.diagnostics
                if not (d.code == "E205" and d.span.start == len(prefix) + condition.start
                        and d.span.end == len(prefix) + condition.end)
            ]
        if problems:
            raise ReplError(_render_all(problems, shown, offset - len(prefix)))
        scratch = dsl.load(f"{prefix}({text}) >= 0 -> continue", "<repl>")
        node = scratch.rules[0].node.condition
        assert isinstance(node, ast.Binary)
        return scratch, node.left

    def _evaluate(self, text: str) -> str:
        scratch, node = self._expression(text)
        snapshot, state = self._what_if(scratch)
        value = value_of(scratch, node, snapshot, state)
        shown = show(scratch, node, value)
        if value is None:
            missing = sorted(k for k in scratch.metric_keys if snapshot.get(k) is None)
            if missing:
                shown += f" (no value for {', '.join(missing)})"
        return shown

    def _what_if(self, policy: CompiledPolicy) -> tuple[dict[str, float | None], PolicyState]:
        """A policy's state after an evaluation now, with the current values.

        Windows need the past: the past evaluations their horizon covers are
        replayed first, from the snapshots they recorded.
        """
        state = policy.new_state()
        past = [t for t in self.ticks if t.at < self.now]
        if policy.windows:
            seconds = sum(w.seconds or 0.0 for w in policy.windows)
            count = sum(w.last_n or 0 for w in policy.windows)
            recent = sum(1 for t in past if t.at > self.now - seconds)
            keep = max(recent, count)
            past = past[max(0, len(past) - keep) :] if keep else []
        else:
            past = []
        for t in past:
            policy.evaluate(t.at, t.snapshot, state)
        snapshot = self._snapshot(self.now)
        policy.evaluate(self.now, snapshot, state)
        return snapshot, state

    def _snapshot(self, t: float) -> dict[str, float | None]:
        """What the policy sees at t: the inputs, and context defaults as in a test file."""
        snapshot: dict[str, float | None] = dict.fromkeys(self.policy.metric_keys)
        snapshot.update({"weight": 0.0, "step": 0.0, "elapsed": t, "step_elapsed": t})
        for key, source in self.inputs.items():
            snapshot[key] = source.at(t, self.interval)
        return snapshot

    # --- values -----------------------------------------------------------------

    def _key(self, text: str, entry: str | None = None, offset: int = 0) -> tuple[str, Dim]:
        """The snapshot key and kind of a metric or context name (`p99` -> canary.p99)."""
        policy, node = self._expression(text, entry, offset)
        if not isinstance(node, ast.Ref):
            raise ReplError(f"`{text}` is not a metric or context name such as canary.p99")
        return key_of(node), policy.checked.types[node]

    def _assign(self, entry: str, m: re.Match[str]) -> str:
        key, dim = self._key(m.group("lhs"), entry, m.start("lhs"))
        rhs = _strip_comment(m.group("rhs").strip())
        if not rhs:
            raise ReplError(f"write a value after `=`: {_EXAMPLES[dim]}")
        if rhs in _UNKNOWN_WORDS:
            self.inputs[key] = Constant(None)
            return f"{key} = unknown"
        policy, node = self._expression(rhs, entry, m.start("rhs"))
        given = policy.checked.types[node]
        where = Span(m.start("rhs"), m.start("rhs") + len(rhs))
        if given is Dim.BOOL:
            diag = Diagnostic("E205", f"`{key}` takes a number, not a condition", where,
                              help=f"write {_EXAMPLES[dim]}")
            raise ReplError(render(diag, entry, "<repl>"))
        if given is not dim and given is not Dim.NUMBER:
            if key == "weight" and given is Dim.RATIO:
                diag = Diagnostic("E204", "the weight is a number from 0 to 100, not a percentage",
                                  where, help="write a plain number such as 25")
            else:
                diag = Diagnostic("E201", f"`{key}` is a {dim.value}, not a {given.value}", where,
                                  help=f"write {_EXAMPLES[dim]} (plain numbers are in base units)")
            raise ReplError(render(diag, entry, "<repl>"))
        snapshot, state = self._what_if(policy)
        value = value_of(policy, node, snapshot, state)
        if isinstance(value, bool) or (value is not None and not math.isfinite(value)):
            raise ReplError(f"`{rhs}` is too large to be a value")
        self.inputs[key] = Constant(value)
        return f"{key} = {format_value(value, dim)}"

    def _series(self, args: str) -> str:
        name, _, values = args.partition(" ")
        if not name or not values.strip():
            raise ReplError("write `:series KEY VALUES`, such as `:series canary.p99 0.1x3 0.5x10`")
        key, _ = self._key(name)
        try:
            samples = parse_series(values)
        except SeriesError as e:
            raise ReplError(f"`:series {key}`: column {e.column}: {e.message}") from None
        if not samples:
            raise ReplError("the series has no samples")
        start = self._next_time()
        self.inputs[key] = SeriesInput(tuple(samples), start, "series")
        last = start + (len(samples) - 1) * self.interval
        return (
            f"{key}: {_count(len(samples), 'sample')} every {format_duration(self.interval)}, "
            f"t={format_duration(start)} to t={format_duration(last)}"
        )

    def _values(self, args: str) -> str:
        if not self.inputs:
            return "no values set: `canary.p99 = 350ms`, `:series canary.p99 0.1x3 0.5x10`"
        width = max(map(len, self.inputs))
        lines = []
        for key, source in sorted(self.inputs.items()):
            dim = self.metric_dim(key.split(".")[-1]) or Dim.NUMBER
            now = format_value(source.at(self.now, self.interval), dim)
            lines.append(f"{key.ljust(width)}  {now:>8}  {source.describe(dim)}")
        return "\n".join(lines)

    # --- time -------------------------------------------------------------------

    def _next_time(self) -> float:
        return len(self.ticks) * self.interval

    def _evaluate_next(self) -> Tick:
        t = self._next_time()
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
        return self._report([self._evaluate_next() for _ in range(n)])

    def _advance(self, args: str) -> str:
        if not args:
            raise ReplError("write `:advance DURATION`, such as `:advance 2m`")
        target = self.now + _duration(args, "a duration")
        due = math.floor(target / self.interval + _HORIZON * max(1.0, target / self.interval))
        count = due + 1 - len(self.ticks)
        if count > MAX_TICKS:
            raise ReplError(
                f"that is {count} evaluations every {format_duration(self.interval)}; "
                f"advance at most {MAX_TICKS} at a time"
            )
        ticks = [self._evaluate_next() for _ in range(max(0, count))]
        # land on the last evaluation when the target is that tick, give or take rounding
        if not ticks or target - ticks[-1].at > _HORIZON * max(1.0, target):
            self.now = target
        if not ticks:
            return (
                f"t={format_duration(self.now)}: no evaluation due "
                f"(the next is at t={format_duration(self._next_time())})"
            )
        return self._report(ticks)

    def _interval(self, args: str) -> str:
        if not args:
            return f"evaluations every {format_duration(self.interval)}; series samples as often"
        seconds = _duration(args, "an interval")
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

    def _report(self, ticks: Sequence[Tick]) -> str:
        """Each evaluation with its rules' states; a long run folds the unchanged ones."""
        lines: list[str] = []
        before = len(self.ticks) - len(ticks) - 1
        previous = _signature(self.ticks[before].verdict) if before >= 0 else None
        folded = 0
        for i, tick in enumerate(ticks):
            signature = _signature(tick.verdict)
            if signature == previous and 0 < i < len(ticks) - 1:
                folded += 1
                continue
            if folded:
                lines.append(f"  ... {_count(folded, 'evaluation')} without change")
                folded = 0
            lines.append(tick_text(tick))
            previous = signature
        return "\n".join(lines)

    # --- explaining -------------------------------------------------------------

    def _find_rule(self, label: str) -> CompiledRule:
        if not label:
            deciding = self.ticks[-1].verdict.rule if self.ticks else None
            if deciding is None:
                names = ", ".join(self.rule_labels()) or "none yet"
                raise ReplError(f"name a rule: `:explain RULE` (rules: {names})")
            label = deciding
        for rule in self.policy.rules:
            if rule.label == label:
                return rule
        labels = self.rule_labels()
        hint = closest(label, labels)
        mean = f"; did you mean `{hint}`?" if hint else ""
        raise ReplError(f"no rule `{label}`{mean} (rules: {', '.join(labels) or 'none yet'})")

    def _explain(self, args: str) -> str:
        rule = self._find_rule(args.strip())
        snapshot, state = self._what_if(self.policy)
        condition = rule.node.condition
        rows = explain_tree(self.policy, condition, snapshot, state)
        kinds = [_kind(self.policy, n) for n in _depth_first(condition)]
        texts = ["  " * depth + text for depth, text, _ in rows]
        width = min(max(map(len, texts)), 60)
        value_width = max(len(v) for _, _, v in rows)
        head = self.composed.text[rule.node.span.start : rule.node.span.end]
        lines = [f"{head}    (values at t={format_duration(self.now)})"]
        if self.ticks:
            verdict = self.ticks[-1].verdict
            status = verdict.rules[self.policy.rules.index(rule)]
            at = format_duration(verdict.at)
            lines.append(f"state at t={at}: {_state_text(verdict, status)}")
        for text, (_, _, value), kind in zip(texts, rows, kinds, strict=True):
            lines.append(f"  {text.ljust(width)}  {value.rjust(value_width)}  {kind}".rstrip())
        return "\n".join(lines)

    def _rules(self, args: str) -> str:
        statements = self.policy.checked.policy.statements
        if not statements:
            return "no rules: `:load FILE`, or type one such as `p99 > 300ms for 2m -> rollback`"
        verdict = self.ticks[-1].verdict if self.ticks else None
        states = {s.rule: _state_text(verdict, s) for s in verdict.rules} if verdict else {}
        rows = []
        for s in statements:
            text = self.composed.text[s.span.start : s.span.end]
            label = s.label if isinstance(s, ast.Rule) else ""
            rows.append((text, self.composed.origin_of(s.span.start), states.get(label, "")))
        width = min(max(len(r[0]) for r in rows), 70)
        origin_width = max(len(r[1]) for r in rows)
        return "\n".join(
            f"{text.ljust(width)}  {origin.ljust(origin_width)}  {state}".rstrip()
            for text, origin, state in rows
        )

    # --- saving -----------------------------------------------------------------

    def _save(self, args: str) -> str:
        words = _words(args)
        if len(words) != 1:
            raise ReplError("write `:save FILE`, such as `:save checkout_session_test.yaml`")
        path = words[0]
        if not self.ticks:
            raise ReplError("nothing to pin yet: run evaluations with `:tick` or `:advance` first")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ReplError(f"{path}: no such directory {directory}")
        if os.path.exists(path) and os.path.realpath(path) not in self._saved:
            raise ReplError(f"{path} exists; choose another name (the session never overwrites it)")
        rule_file, rules_text = self._rule_file_for(path, directory)
        test_text = self._test_text(os.path.relpath(rule_file, directory))
        try:
            if rules_text is not None:
                with open(rule_file, "w", encoding="utf-8") as f:
                    f.write(rules_text)
            with open(path, "w", encoding="utf-8") as f:
                f.write(test_text)
        except OSError as e:
            raise ReplError(f"{path}: cannot write: {e.strerror or e}") from None
        written = [path] if rules_text is None else [path, rule_file]
        self._saved.update(os.path.realpath(p) for p in written)
        said = f"wrote {' and '.join(written)}; {self._verify(path, test_text)}"
        if not re.search(r"_test\.ya?ml$", path):
            said += "\n(`codedance test DIR` finds test files named *_test.yaml)"
        return said

    def _rule_file_for(self, path: str, directory: str) -> tuple[str, str | None]:
        """The policy file the test names: the loaded file, or a copy of the session's rules."""
        if len(self.files) == 1 and not self.typed:
            loaded, text = self.files[0]
            try:
                unchanged = read_text(loaded) == text
            except FileProblem:
                unchanged = False
            if unchanged:
                return loaded, None
        stem = re.sub(r"\.ya?ml$", "", path)
        rule_file = stem + ".rules"
        loaded_paths = {os.path.realpath(p) for p, _ in self.files}
        if os.path.realpath(rule_file) in loaded_paths:
            raise ReplError(f"saving would overwrite the loaded {rule_file}; choose another name")
        if os.path.exists(rule_file) and os.path.realpath(rule_file) not in self._saved:
            raise ReplError(f"{rule_file} exists; choose another name for the test file")
        return rule_file, self.composed.text

    def _test_text(self, rule_file: str) -> str:
        context, series = self._recorded_inputs()
        lines = [
            "# Written by `codedance repl` (:save): the verdicts of an exploration, pinned.",
            f"rule_files: [{json.dumps(rule_file)}]",
            f"evaluation_interval: {_duration_text(self.interval)}",
            "tests:",
            '  - name: "repl session"',
        ]
        if context:
            values = ", ".join(f"{k}: {_number_text(v)}" for k, v in context.items())
            lines.append(f"    context: {{{values}}}")
        lines.append("    input_series:" + ("" if series else " []"))
        for key, values_text in series.items():
            lines += [f"      - series: {key}", f"        values: {json.dumps(values_text)}"]
        lines.append("    expect:")
        for tick in self._pinned():
            lines += [
                f"      - at: {_duration_text(tick.at)}",
                f"        action: {tick.verdict.action.value}",
            ]
            if tick.verdict.rule is not None:
                lines.append(f"        rule: {json.dumps(tick.verdict.rule)}")
        return "\n".join(lines) + "\n"

    def _recorded_inputs(self) -> tuple[dict[str, float], dict[str, str]]:
        """What the evaluations saw, as a test file's `context` and `input_series`."""
        read = self.policy.metric_keys | self.policy.context_keys
        context: dict[str, float] = {}
        series: dict[str, str] = {}
        for key in sorted(read):
            values = [t.snapshot.get(key) for t in self.ticks]
            if key in CONTEXT:
                defaults = [t.at if key in ("elapsed", "step_elapsed") else 0.0 for t in self.ticks]
                if values == defaults:
                    continue
                first = values[0]
                if first is not None and all(v == first for v in values):
                    context[key] = first
                    continue
            elif all(v is None for v in values):
                continue  # a metric without a series is unknown, as it was here
            series[key] = series_text(values)
        return context, series

    def _pinned(self) -> list[Tick]:
        """The first and last evaluations, and both sides of every change of verdict."""
        keys = [(t.verdict.action, t.verdict.rule) for t in self.ticks]
        pins = {0, len(keys) - 1}
        for i in range(1, len(keys)):
            if keys[i] != keys[i - 1]:
                pins.update((i - 1, i))
        return [self.ticks[i] for i in sorted(pins)]

    def _verify(self, path: str, text: str) -> str:
        import yaml

        from engine.policytest import run_test_file

        result = run_test_file(path, yaml.safe_load(text))
        if result.status == "passed":
            expected = sum(1 for line in text.splitlines() if line.strip().startswith("- at:"))
            return f"{_count(expected, 'expectation')}, and `codedance test` passes"
        problems = [p.describe() for p in result.problems] + [
            f.headline() for c in result.cases for f in c.failures
        ] + [p.describe() for c in result.cases for p in c.problems]
        return "but `codedance test` does not pass it: " + "; ".join(problems)

    # --- Prometheus -------------------------------------------------------------

    def _prom(self, command: str) -> SyncPrometheus:
        if self.prometheus is None:
            raise ReplError(f"`{command}` needs a Prometheus: start the REPL with --prometheus URL")
        return self.prometheus

    def _query(self, args: str) -> str:
        from adapters.metrics.prometheus import PrometheusError

        prom = self._prom(":query")
        if not args:
            raise ReplError("write `:query PROMQL`, such as `:query up`")
        try:
            series = prom.query(args, self.clock())
        except PrometheusError as e:
            raise ReplError(_prometheus_problem(prom, e)) from None
        if not series:
            return "no series"
        lines = []
        for s in series[:50]:
            labels = ", ".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            value = s.points[-1][1] if s.points else None
            lines.append(f"{{{labels}}}  {format_value(value, Dim.NUMBER)}")
        if len(series) > 50:
            lines.append(f"... and {len(series) - 50} more series")
        return "\n".join(lines)

    def _pull(self, args: str) -> str:
        words = args.split()
        if len(words) != 2:
            raise ReplError("write `:pull KEY RANGE`, such as `:pull canary.p99 30m`")
        key, _ = self._key(words[0])
        if key in CONTEXT:
            raise ReplError(f"`{key}` is a value of the rollout, not a metric; set it with `=`")
        seconds = _duration(words[1], "a range")
        step = self.interval
        if seconds / step + 1 > MAX_PULL_SAMPLES:
            raise ReplError(
                f"{words[1]} every {format_duration(step)} is more than {MAX_PULL_SAMPLES} "
                "samples; pull a shorter range or set a longer `:interval`"
            )
        prom = self._prom(":pull")
        samples, query = self._pull_samples(prom, key, seconds, step)
        if all(v is None for v in samples):
            raise ReplError(f"Prometheus has no samples of {key} in the last {words[1]} ({query})")
        start = self._next_time()
        self.inputs[key] = SeriesInput(tuple(samples), start, f"Prometheus, last {words[1]}")
        missing = sum(v is None for v in samples)
        return (
            f"{key}: {_count(len(samples), 'sample')} every {format_duration(step)} from "
            f"Prometheus ({missing} missing), from t={format_duration(start)}"
        )

    def _pull_samples(
        self, prom: SyncPrometheus, key: str, seconds: float, step: float
    ) -> tuple[list[float | None], str]:
        from adapters.metrics import range_times
        from adapters.metrics.prometheus import PrometheusError, distribute
        from engine.ports import MetricRequest

        track, metric = key.split(".", 1)
        defined = {d.name: d.template for d in self.policy.checked.definitions}
        if metric not in defined and metric not in prom.planner.catalog:
            raise ReplError(f"the metric catalog has no query for `{metric}`")
        request = MetricRequest(self._target(track), metric, max(60.0, step), defined.get(metric))
        plan = prom.planner.plan([request], interval=step)
        if not plan.queries:
            raise ReplError(f"no query can be made for {key} of {request.target.workload}")
        query = plan.queries[0]
        end = math.floor(self.clock() / step) * step
        times = range_times(end - seconds, end, step)
        try:
            series = prom.query_range(query.text, times[0], times[-1], step)
        except PrometheusError as e:
            raise ReplError(_prometheus_problem(prom, e)) from None
        by_index: dict[int, float | None] = {}
        for t, v in distribute(query, series).get(request, ()):
            i = round((t - times[0]) / step)
            if 0 <= i < len(times) and abs(times[i] - t) <= 0.002:  # Prometheus keeps ms
                by_index[i] = v
        return [by_index.get(i) for i in range(len(times))], _one_line(query.text)[:160]

    def _target(self, track: str) -> Target:
        from engine.ports import Target

        if self.rollout is None:
            raise ReplError("`:pull` needs the workload: start the REPL with --rollout NS/NAME")
        namespace, workload = self.rollout
        if track == "canary":
            return Target(namespace, self.canary or f"{workload}-canary", "canary")
        return Target(namespace, workload, "stable")


# ---------------------------------------------------------------- text


def tick_text(tick: Tick) -> str:
    """`t=2m30s  rollback: latency: ...  (health 0)` and each rule's state below it."""
    v = tick.verdict
    head = f"t={format_duration(tick.at)}  {v.explanation}  (health {v.health:.0f})"
    trace = v.trace()
    return head + "".join(f"\n    {line}" for line in trace.splitlines())


def _signature(v: Verdict) -> tuple[object, ...]:
    return (v.action, v.rule, tuple((r.state, r.condition) for r in v.rules))


def _state_text(verdict: Verdict, status: RuleStatus) -> str:
    cond = {True: "true", False: "false", None: "unknown"}[status.condition]
    if status.pending_since is None:
        return f"inactive (condition {cond})"
    held = format_duration(verdict.at - status.pending_since)
    since = format_duration(status.pending_since)
    return f"{status.state} since t={since} (true for {held})"


def _depth_first(node: ast.Expr) -> list[ast.Expr]:
    """The nodes in the order `explain_tree` lists them."""
    out = [node]
    for child in ast.children(node):
        if not isinstance(child, ast.LastN):
            out.extend(_depth_first(child))
    return out


def _kind(policy: CompiledPolicy, node: ast.Expr) -> str:
    dim = policy.checked.types.get(node)
    if dim is None:
        return ""
    return "condition" if dim is Dim.BOOL else dim.value


def _strip_comment(text: str) -> str:
    """The text before a `#` comment (expressions have no backtick queries to protect)."""
    return text.split("#", 1)[0].rstrip() if "`" not in text else text


def _words(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as e:
        raise ReplError(f"cannot read the arguments: {e}") from None


def _prometheus_problem(prom: SyncPrometheus, error: Exception) -> str:
    """One line: the connection's reason without the HTTP library's wrapping, or the server's."""
    text = " ".join(str(error).split())
    prefix = "cannot reach Prometheus: "
    if not text.startswith(prefix):
        return f"Prometheus: {text[:200]}"
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text) or re.search(r"(\w+ timed out)", text)
    if m is not None:
        reason = m.group(1).strip()
    elif "Pool(" not in text:
        reason = text[len(prefix) :][:120]
    else:
        reason = "no connection"
    return f"cannot reach Prometheus at {prom.base_url}: {reason}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


_HELP = "\n".join(
    [
        "Type a rule to add it (`latency: p99 > 300ms for 2m -> rollback`; the same name",
        "replaces it), a value (`canary.p99 = 350ms`, `p99 = 0.35`, `weight = 25`, `p99 = _`),",
        "or any expression to see its value (`canary.p99 / stable.p99`). Commands:",
        *(f"  {text}" for name, text in COMMANDS.items()),
        "Series values are in base units (seconds, 0..1 ratios, bytes), as in test files.",
    ]
)
