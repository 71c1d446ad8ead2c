"""Policy tests (LANGUAGE.md section 8): a parsed test file in, pass/fail per test out.

In: the path of a `*_test.yaml` file and its content as plain data (the
command line parses the YAML; the engine never imports a YAML library). Out: a
`TestFileResult` whose cases say `passed`, `failed` (with every failed
expectation, its expected and got action and the got verdict's explanation and
trace) or `error` (a test that cannot run as written).

The file format is modelled on `promtool test rules`::

    rule_files: [checkout.rules]        # relative to the test file
    evaluation_interval: 30s            # default 1m
    tests:
      - name: slow canary is rolled back
        interval: 30s                   # sample spacing; default evaluation_interval
        context: {weight: 25}
        input_series:
          - {series: canary.p99, values: "0.1x3 0.5x10"}
        expect:
          - {at: 4m, action: rollback, rule: latency}

Each test replays its series once (`engine.timeline.replay`) up to its latest
`at`; an expectation checks the verdict of the last tick at or before `at`.
Problems are reported with `loc`, the path of keys to the offending value, so
that a caller holding the YAML can point at its line. Typos are errors, not
silent passes: unknown keys, a series the policy does not read, a rule name
the policy does not have, all with the closest existing name.

Several rule files are evaluated side by side as separate policies; the
verdict checked at a tick is the strongest of theirs (priority, then the
order of `rule_files`), and its trace lists the rules of all of them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dsl import PolicyError, load
from dsl.ast import Action, Dim
from dsl.builtins import ACTIONS, CONTEXT
from dsl.compile import CompiledPolicy
from dsl.runtime import Verdict
from dsl.series import SeriesError, parse_series, sample_index
from dsl.units import UnitError, closest, format_duration, parse_quantity
from engine.timeline import replay, series_key

Loc = tuple[str | int, ...]
# A test replays every tick up to its latest `at`; a typo such as `at: 400d`
# with a 1s interval must be an error, not minutes of evaluation.
MAX_EVALUATIONS = 1_000_000
Status = Literal["passed", "failed", "error"]

# ---------------------------------------------------------------- the format


def _duration(value: Any) -> float:
    """`30s`, `1m30s` (and a bare 0) to seconds; anything else is an error."""
    if isinstance(value, bool):
        raise ValueError(f"`{value}` is not a duration; write one such as 30s or 1m30s")
    if isinstance(value, int | float) and value == 0:
        return 0.0
    if isinstance(value, int | float):
        raise ValueError(f"`{value}` needs a unit: write a duration such as {value}s or {value}m")
    if not isinstance(value, str):
        raise ValueError("write a duration such as 30s or 1m30s")
    text = value.strip()
    if text == "0":
        return 0.0
    try:
        seconds, dim, _ = parse_quantity(text)
    except UnitError as e:
        raise ValueError(
            f"`{value}` is not a duration ({e.message}); write one such as 30s or 1m30s"
        ) from None
    if dim is not Dim.DURATION:
        raise ValueError(f"`{value}` is not a duration; write one such as 30s or 1m30s")
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be a positive duration such as 30s")
    return seconds


def _action(value: Any) -> Action:
    if isinstance(value, Action):
        return value
    if isinstance(value, str) and value in ACTIONS:
        return ACTIONS[value]
    hint = closest(str(value), tuple(ACTIONS))
    did_you_mean = f"did you mean `{hint}`? " if hint else ""
    raise ValueError(f"unknown action `{value}`; {did_you_mean}(actions: {', '.join(ACTIONS)})")


def _series_text(value: Any) -> str:
    # YAML reads `values: 3` as a number; it is the one-sample series "3".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError('write the samples as text, such as "0.1x3 0.5x10"')
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), AfterValidator(_positive)]


class _Model(BaseModel):
    """Frozen, and strict about keys: a misspelt key is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = tuple(cls.model_fields)
            unknown = [str(k) for k in data if k not in allowed]
            if unknown:
                hints = [closest(k, allowed) for k in unknown]
                said = ", ".join(
                    f"`{k}`" + (f" (did you mean `{h}`?)" if h else "")
                    for k, h in zip(unknown, hints, strict=True)
                )
                plural = "s" if len(unknown) > 1 else ""
                raise ValueError(f"unknown key{plural} {said}; allowed keys: {', '.join(allowed)}")
        return data


class InputSeries(_Model):
    series: str
    values: Annotated[str, BeforeValidator(_series_text)]


class Expectation(_Model):
    at: Duration
    action: Annotated[Action, BeforeValidator(_action)]
    rule: str | None = None


class PolicyTestCase(_Model):
    name: str | None = None
    interval: PositiveDuration | None = None
    context: dict[str, float] = Field(default_factory=dict)
    input_series: list[InputSeries] = Field(default_factory=list)
    expect: list[Expectation] = Field(min_length=1)

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value  # pydantic reports the wrong type
        return {str(k): _context_value(str(k), v) for k, v in value.items()}


def _context_value(name: str, value: Any) -> float:
    if name not in CONTEXT:
        hint = closest(name, tuple(CONTEXT))
        did_you_mean = f"did you mean `{hint}`? " if hint else ""
        raise ValueError(
            f"unknown context value `{name}`; {did_you_mean}(context values: {', '.join(CONTEXT)})"
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    dim = CONTEXT[name].dim
    if isinstance(value, str) and dim is Dim.DURATION:
        return _duration(value)
    example = "5m" if dim is Dim.DURATION else "25"
    raise ValueError(f"`{name}: {value}` is not a {dim.value}; write a value such as {example}")


class PolicyTestFile(_Model):
    rule_files: list[str] = Field(min_length=1)
    evaluation_interval: PositiveDuration = 60.0
    tests: list[PolicyTestCase] = Field(min_length=1)


# ---------------------------------------------------------------- the results


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a test file or test cannot run; `loc` is the key path to the culprit."""

    message: str
    loc: Loc = ()
    detail: str = ""  # more lines, such as a rule file's diagnostics

    def describe(self) -> str:
        where = _loc_text(self.loc)
        head = f"{where}: {self.message}" if where else self.message
        return f"{head}\n{self.detail}" if self.detail else head


@dataclass(frozen=True, slots=True)
class ExpectationFailure:
    """An expectation the verdict at its tick does not meet."""

    at: float
    tick: float
    expected: Action
    expected_rule: str | None
    got: Verdict

    def headline(self) -> str:
        """`at 4m: expected rollback (rule latency), got continue`."""
        when = format_duration(self.at)
        if abs(self.tick - self.at) > 1e-9 * max(1.0, self.at):
            when += f" (evaluated at {format_duration(self.tick)})"
        expected = self.expected.value
        if self.expected_rule is not None:
            expected += f" (rule {self.expected_rule})"
        got = self.got.action.value
        if self.got.rule is not None:
            got += f" (rule {self.got.rule})"
        return f"at {when}: expected {expected}, got {got}"

    def describe(self) -> str:
        """The headline, the got verdict's explanation and its trace, indented."""
        trace = "\n".join(f"    {line}" for line in self.got.trace().splitlines())
        return f"{self.headline()}\n  {self.got.explanation}\n  trace:\n{trace}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    failures: tuple[ExpectationFailure, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def status(self) -> Status:
        if self.problems:
            return "error"
        return "failed" if self.failures else "passed"


@dataclass(frozen=True, slots=True)
class TestFileResult:
    """The outcome of one test file: its cases, or the problems that stopped it."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    path: str
    cases: tuple[CaseResult, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def status(self) -> Status:
        statuses = {c.status for c in self.cases}
        if self.problems or "error" in statuses:
            return "error"
        return "failed" if "failed" in statuses else "passed"


# ---------------------------------------------------------------- running


def run_test_file(path: str | os.PathLike[str], data: object) -> TestFileResult:
    """Run every test of a test file whose YAML has already been parsed into `data`."""
    path = os.fspath(path)
    try:
        spec = PolicyTestFile.model_validate(data)
    except ValidationError as e:
        return TestFileResult(path, problems=tuple(_problems(e, data)))
    policies, problems = _load_rule_files(path, spec.rule_files)
    if problems:
        return TestFileResult(path, problems=tuple(problems))
    cases = tuple(
        _run_case(("tests", i), case, i, spec.evaluation_interval, policies)
        for i, case in enumerate(spec.tests)
    )
    return TestFileResult(path, cases=cases)


def _load_rule_files(
    test_path: str, rule_files: Sequence[str]
) -> tuple[list[tuple[str, CompiledPolicy]], list[Problem]]:
    policies: list[tuple[str, CompiledPolicy]] = []
    problems: list[Problem] = []
    base = os.path.dirname(test_path)
    for i, name in enumerate(rule_files):
        shown = os.path.normpath(os.path.join(base, name))
        try:
            with open(shown, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(f"cannot read `{shown}`: {_reason(e)}", ("rule_files", i)))
            continue
        try:
            policies.append((shown, load(source, shown)))
        except PolicyError as e:
            problems.append(Problem(f"`{shown}` has errors", ("rule_files", i), e.render()))
    return policies, problems


def _reason(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
    return error.strerror or str(error)


def _run_case(
    loc: Loc,
    case: PolicyTestCase,
    index: int,
    evaluation_interval: float,
    policies: Sequence[tuple[str, CompiledPolicy]],
) -> CaseResult:
    name = case.name if case.name is not None else f"test {index + 1}"
    series, problems = _case_series(loc, case, policies)
    problems += _unknown_rules(loc, case, policies)
    if problems:
        return CaseResult(name, problems=tuple(problems))
    interval = case.interval if case.interval is not None else evaluation_interval
    until = max(e.at for e in case.expect)
    if until / evaluation_interval >= MAX_EVALUATIONS:
        latest = max(range(len(case.expect)), key=lambda k: case.expect[k].at)
        return CaseResult(
            name,
            problems=(
                Problem(
                    f"`at: {format_duration(until)}` needs more than {MAX_EVALUATIONS} "
                    f"evaluations every {format_duration(evaluation_interval)}",
                    (*loc, "expect", latest, "at"),
                ),
            ),
        )
    # One replay per test: every expectation reads the same verdicts.
    verdicts = _combine(
        [
            replay(p, series, interval, evaluation_interval, until, case.context)
            for _, p in policies
        ],
        [shown for shown, _ in policies],
    )
    failures = []
    for e in case.expect:
        got = verdicts[min(sample_index(evaluation_interval, e.at), len(verdicts) - 1)]
        if got.action is not e.action or (e.rule is not None and got.rule != e.rule):
            failures.append(ExpectationFailure(e.at, got.at, e.action, e.rule, got))
    return CaseResult(name, failures=tuple(failures))


def _case_series(
    loc: Loc, case: PolicyTestCase, policies: Sequence[tuple[str, CompiledPolicy]]
) -> tuple[dict[str, list[float | None]], list[Problem]]:
    """The test's series by name, after checking each names something the policy reads."""
    readable = frozenset().union(*(p.metric_keys | p.context_keys for _, p in policies))
    series: dict[str, list[float | None]] = {}
    seen: dict[str, str] = {}
    problems: list[Problem] = []
    for j, s in enumerate(case.input_series):
        where = (*loc, "input_series", j)
        key = series_key(s.series)
        if key not in readable:
            hint = closest(key, readable | frozenset(CONTEXT))
            did_you_mean = f"; did you mean `{hint}`?" if hint else ""
            reads = ", ".join(sorted(readable)) or "nothing"
            problems.append(
                Problem(
                    f"the policy does not read `{s.series}`{did_you_mean} (it reads: {reads})",
                    (*where, "series"),
                )
            )
        elif key in seen:
            problems.append(
                Problem(f"`{s.series}` is the same series as `{seen[key]}`", (*where, "series"))
            )
        elif key in case.context:
            problems.append(
                Problem(f"`{key}` is given both in `context` and as a series", (*where, "series"))
            )
        seen.setdefault(key, s.series)
        try:
            series[s.series] = parse_series(s.values)
        except SeriesError as e:
            problems.append(Problem(f"column {e.column}: {e.message}", (*where, "values")))
    return series, problems


def _unknown_rules(
    loc: Loc, case: PolicyTestCase, policies: Sequence[tuple[str, CompiledPolicy]]
) -> list[Problem]:
    labels = tuple(r.label for _, p in policies for r in p.rules)
    problems = []
    for k, e in enumerate(case.expect):
        if e.rule is not None and e.rule not in labels:
            hint = closest(e.rule, labels)
            did_you_mean = f"; did you mean `{hint}`?" if hint else ""
            problems.append(
                Problem(
                    f"the policy has no rule `{e.rule}`{did_you_mean} (rules: {', '.join(labels)})",
                    (*loc, "expect", k, "rule"),
                )
            )
    return problems


def _combine(runs: Sequence[Sequence[Verdict]], names: Sequence[str]) -> list[Verdict]:
    """One verdict per tick from several policies: the strongest, with every rule traced."""
    if len(runs) == 1:
        return list(runs[0])
    combined = []
    for verdicts in zip(*runs, strict=True):
        # A rule that fires beats "no rule fires" at the same action; then file order.
        _, _, strongest = min(
            ((v.action.priority, v.rule is None, i) for i, v in enumerate(verdicts)),
        )
        pairs = list(zip(names, verdicts, strict=True))
        combined.append(
            dataclasses.replace(
                verdicts[strongest],
                conditions=tuple(c for _, v in pairs for c in v.conditions),
                pending_since=tuple(p for _, v in pairs for p in v.pending_since),
                firing=tuple(f for _, v in pairs for f in v.firing),
                rule_info=tuple(
                    (f"{os.path.basename(name)}: {label}", action)
                    for name, v in pairs
                    for label, action in v.rule_info
                ),
            )
        )
    return combined


# ---------------------------------------------------------------- messages


def _problems(error: ValidationError, data: object) -> list[Problem]:
    if not isinstance(data, Mapping):
        return [Problem("a test file is a mapping with the keys `rule_files` and `tests`")]
    problems = []
    for err in error.errors(include_url=False):
        loc: Loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "value_error":
            message = str(err["ctx"]["error"])
        elif kind == "missing" and loc:
            loc, message = loc[:-1], f"`{loc[-1]}` is required"
        elif kind == "too_short":
            message = "needs at least one entry"
        else:
            message = err["msg"][:1].lower() + err["msg"][1:]
        problems.append(Problem(message, loc))
    return problems


def _loc_text(loc: Loc) -> str:
    """`("tests", 0, "expect", 1, "at")` -> `tests[0].expect[1].at`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
