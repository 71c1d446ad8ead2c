"""Fuzzing the policy front end: any text gives diagnostics or a working policy, never a traceback.

The law (LANGUAGE.md section 7: "a traceback is a bug"): for any string,
`dsl.check_source` returns a list of `Diagnostic`. When the list is empty,
`dsl.load` gives a policy that evaluates snapshots and explains its verdicts;
otherwise every diagnostic renders in the fixed format, points inside the text
(or one past its end) and speaks the author's words, not lark's.

Inputs come from four places:

- a deterministic mutation loop (`random.Random(FUZZ_SEED)`) over the seed
  corpus of `fuzz_corpus.py`: tokens deleted, swapped, duplicated, inserted
  and replaced, lines shuffled, seeds spliced, odd unicode dropped in, plus
  random bytes decoded as latin-1 and UTF-8 and random token soup; at least
  `MUTATED_INPUTS` inputs per run, so a failure names the seed and the input
  and reproduces exactly (set CODEDANCE_FUZZ_SEED to explore other seeds);
- hypothesis, for a smaller structured part (valid generated policies, then
  mutated; any expression the grammar can write; arbitrary unicode text);
- one test per hostile shape: deep nesting (100,000 parentheses, 50,000 `not`,
  10,000 nested `abs`, 100,000 terms) and huge input (2 MB, a 200,000
  character line, 10,000 rules), plus the regressions fuzzing found (long
  policies, long-line columns, quadratic rendering and template checks,
  overflowing values in explanations).

Snapshot values are finite floats or None, as metric sources give them,
including magnitudes whose sums and products overflow to infinity.
"""

from __future__ import annotations

import os
import random
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsl
from dsl.ast import Action, Binary, Expr, Number, Policy, Span
from dsl.builtins import ACTIONS, CONTEXT, FUNCTIONS, METRICS, TRACKS, UNIT_NAMES
from dsl.compile import CompiledPolicy
from dsl.diagnostics import CODES, Diagnostic, LineIndex, render
from dsl.format import format_policy
from tests.dsl import strategies
from tests.dsl.fuzz_corpus import ODD_TEXT, SEEDS, SHORT_SEEDS, SIBLINGS, TOKENS

FUZZ_SEED = int(os.environ.get("CODEDANCE_FUZZ_SEED", "20240611"))
MUTATED_INPUTS = 20_000
PATH = "fuzz.rules"

HEADER = re.compile(r"^fuzz\.rules:(\d+):(\d+): error\[E\d{3}\]: .+")

# What lark would leak if an error were not put in the author's words: the
# grammar's terminal names (read from the grammar, so a new terminal is
# covered), lark's own names, regex fragments and Python reprs.
_GRAMMAR = (Path(dsl.__file__).parent / "grammar.lark").read_text(encoding="utf-8")
TERMINALS = frozenset(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*:", _GRAMMAR, re.MULTILINE))
_TERMINAL_WORD = re.compile(r"(?<![\w$])(?:__ANON\w*|\$END|" + "|".join(TERMINALS) + r")(?!\w)")
_ANYWHERE = ("__ANON", "$END", "(?:", "Token(", "UnexpectedToken", "UnexpectedCharacters", "\\d+")

# Values a metric source can hand over: finite floats or None (unknown).
MODERATE_VALUES: tuple[float | None, ...] = (
    None, None, 0.0, -0.0, 1.0, -1.0, 0.5, 0.001, 0.999, 3.0, 42.0, 100.0, 250.0, -7.5,
    1e-6, 1e6, 1e9, -1e9,
)
# Their sums, products and quotients overflow to inf, or reach nan (inf - inf).
EXTREME_VALUES: tuple[float | None, ...] = (
    1e308, -1e308, 1.7976931348623157e308, 5e-324, -5e-324, 2.2250738585072014e-308, None, 0.0,
)
SNAPSHOT_VALUES = MODERATE_VALUES + EXTREME_VALUES


# --- the property --------------------------------------------------------------------------


def _quoted_user_text_removed(message: str, text: str) -> str:
    """The message without `...` quotes of the policy's own text (a rule may be named NAME)."""
    return re.sub(r"`([^`]*)`", lambda m: "``" if m.group(1) in text else m.group(0), message)


def check_diagnostic(d: Diagnostic, text: str, index: LineIndex | None = None) -> None:
    """One diagnostic renders in the fixed format, points into the text, speaks plainly."""
    assert isinstance(d, Diagnostic), d
    assert d.code in CODES
    shown = render(d, text, PATH, index)  # without an index, render builds its own
    index = index or LineIndex(text)
    header = shown.split("\n", 1)[0]
    m = HEADER.match(header)
    assert m, f"header not in the fixed format: {header!r}"
    line, col = int(m.group(1)), int(m.group(2))
    lines = len(index.starts)
    assert 1 <= line <= lines, f"line {line} outside the text ({lines} lines)"
    assert 1 <= col <= len(index.line_text(line)) + 1, f"column {col} outside line {line}"
    assert 0 <= d.span.start <= len(text) + 1, f"span {d.span} outside the text"
    # ... and it is where the span starts, in the file's own columns (an editor jumps there).
    expected = index.position(min(d.span.start, len(text)))
    assert (line, col) == expected, f"header says {line}:{col}, the span starts at {expected}"
    for part in (d.message, d.label or ""):
        # The header is one line: a message quoting a multi-line query would break it.
        assert "\n" not in part and "\r" not in part, f"a line break in {part!r}"
        plain = _quoted_user_text_removed(part, text)
        leak = _TERMINAL_WORD.search(plain)
        assert leak is None, f"lark terminal {leak.group()!r} in {part!r}"
    for part in (d.message, d.label or "", d.help or ""):
        plain = _quoted_user_text_removed(part, text)
        for internal in _ANYWHERE:
            assert internal not in plain, f"{internal!r} in {part!r}"


def exercise(
    text: str, rng: random.Random, values: Sequence[float | None] = SNAPSHOT_VALUES
) -> list[Diagnostic]:
    """Run one input through the whole front end; its diagnostics, empty when it loaded.

    Raises AssertionError when a law is broken and lets any other exception
    through: both are findings.
    """
    diagnostics = dsl.check_source(text)
    assert isinstance(diagnostics, list)
    if diagnostics:
        # One index for many diagnostics, as PolicyError.render does.
        index = LineIndex(text) if len(diagnostics) > 20 else None
        for d in diagnostics:
            check_diagnostic(d, text, index)
        return diagnostics
    policy = dsl.load(text, PATH)
    run_policy(policy, rng, values)
    return []


def run_policy(
    policy: CompiledPolicy,
    rng: random.Random,
    values: Sequence[float | None],
    ticks: int = 4,
) -> None:
    """Evaluate a few ticks of random snapshots; every verdict explains itself."""
    keys = sorted(policy.metric_keys | policy.context_keys)
    state = policy.new_state()
    now = rng.uniform(0, 1e6)
    for _ in range(ticks):
        snapshot = {k: rng.choice(values) for k in keys if rng.random() < 0.9}
        verdict = policy.evaluate(now, snapshot, state)
        assert isinstance(verdict.action, Action)
        assert 0.0 <= verdict.health <= 100.0
        assert len(verdict.rules) == len(policy.rules)
        explanation = verdict.explanation
        assert explanation and "\n" not in explanation, explanation
        assert verdict.trace().count("\n") == max(0, len(policy.rules) - 1)
        now += rng.choice((0.001, 1.0, 15.0, 30.0, 60.0, 600.0))


# --- the mutator ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"`[^`]*`?|#[^\n]*|\r?\n|[ \t\f]+|[A-Za-z_][A-Za-z0-9_]*"
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[A-Za-z%]*|->|[<>=!]=|.",
    re.DOTALL,
)


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _some_token(rng: random.Random, tokens: list[str]) -> str:
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(TOKENS)
    if roll < 0.8 and tokens:
        return rng.choice(tokens)
    if roll < 0.95:
        return rng.choice(ODD_TEXT)
    return chr(rng.randrange(0x110000)).encode("utf-8", "replace").decode("utf-8", "replace")


_SIBLINGS_OF = {token: group for group in SIBLINGS for token in group}


def _mutate_tokens(rng: random.Random, tokens: list[str]) -> list[str]:
    if not tokens:
        return [_some_token(rng, tokens)]
    n = len(tokens)
    i = rng.randrange(n)
    op = rng.randrange(9)
    if op >= 7:  # a sibling: another comparison, action, threshold, metric of the kind
        swappable = [j for j, t in enumerate(tokens) if t in _SIBLINGS_OF]
        if swappable:
            j = rng.choice(swappable)
            tokens[j] = rng.choice(_SIBLINGS_OF[tokens[j]])
    elif op == 0:  # delete one to three tokens
        del tokens[i : i + rng.randint(1, 3)]
    elif op == 1:  # swap two tokens, often neighbours
        j = min(n - 1, i + 1) if rng.random() < 0.5 else rng.randrange(n)
        tokens[i], tokens[j] = tokens[j], tokens[i]
    elif op == 2:  # duplicate a run of tokens
        run = tokens[i : i + rng.randint(1, 4)]
        tokens[i:i] = run * rng.randint(1, 3)
    elif op in (3, 4):  # insert a token
        tokens.insert(i, _some_token(rng, tokens))
    elif op == 5:  # replace a token
        tokens[i] = _some_token(rng, tokens)
    else:  # truncate
        del tokens[i:]
    return tokens


def _mutate_text(rng: random.Random, text: str) -> str:
    """Character- and line-level mutations the token mutator cannot make."""
    op = rng.randrange(6)
    i = rng.randrange(len(text) + 1)
    if op == 0:  # odd unicode at a random character position
        return text[:i] + rng.choice(ODD_TEXT) + text[i:]
    if op == 1:  # a character deleted (mid-token, mid-unit, mid-template)
        return text[:i] + text[i + 1 :]
    if op == 2:  # a random character inserted
        return text[:i] + chr(rng.randrange(32, 0x3000)) + text[i:]
    lines = text.split("\n")
    j = rng.randrange(len(lines))
    if op == 3:  # lines shuffled
        rng.shuffle(lines)
    elif op == 4:  # a line duplicated
        lines.insert(j, lines[j])
    elif j + 1 < len(lines):  # two lines joined
        lines[j : j + 2] = [lines[j] + " " + lines[j + 1]]
    return "\n".join(lines)


def random_text(rng: random.Random) -> str:
    """Text that never was a policy: decoded random bytes, or token soup."""
    roll = rng.random()
    if roll < 0.4:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
        return data.decode("latin-1") if rng.random() < 0.5 else data.decode("utf-8", "replace")
    if roll < 0.6:
        alphabet = "p99 >-<=!.:,()%`#\n\t0123456789abcdemsr_" + "".join(ODD_TEXT[:20])
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50)))
    soup = [_some_token(rng, []) for _ in range(rng.randrange(1, 16))]
    return rng.choice(("", " ")).join(soup)


def mutant(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.12:
        return random_text(rng)
    seed = rng.choice(SHORT_SEEDS)
    if roll < 0.18:  # splice two seeds at arbitrary points
        other = rng.choice(SHORT_SEEDS)
        return seed[: rng.randrange(len(seed) + 1)] + other[rng.randrange(len(other) + 1) :]
    text = seed
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if rng.random() < 0.75:
            text = "".join(_mutate_tokens(rng, tokens_of(text)))
        else:
            text = _mutate_text(rng, text)
    return text


def _snapshot_rng(seed: int, index: int) -> random.Random:
    """The snapshots of one input, independent of the others, so one input replays alone."""
    return random.Random(f"{seed}:{index}")


def _finding(seed: int, index: int, text: str, error: BaseException) -> str:
    trace = "".join(traceback.format_exception(error)[-12:])
    return (
        f"fuzz input #{index} (CODEDANCE_FUZZ_SEED={seed}) broke the front end\n"
        f"input: {text!r}\n"
        f"replay: exercise(input, _snapshot_rng({seed}, {index}))\n{trace}"
    )


# --- the corpus --------------------------------------------------------------------------


@pytest.mark.parametrize("source", SEEDS, ids=[f"seed{i}" for i in range(len(SEEDS))])
def test_every_seed_loads(source: str) -> None:
    """Mutations start from valid policies; a seed that stops loading is a finding too."""
    assert exercise(source, random.Random(FUZZ_SEED)) == []


def test_corpus_covers_every_construct() -> None:
    joined = "\n".join(SEEDS)
    words = re.findall(r"[A-Za-z_]\w*", joined)
    for required in (
        *ACTIONS, *FUNCTIONS, *CONTEXT, *METRICS, *UNIT_NAMES, *TRACKS,
        "for", "and", "or", "not", "true", "false", "last", "metric", "promql", "as",
    ):
        assert required in words, f"no seed uses `{required}`"
    for op in (">=", "<=", "==", "!=", " > ", " < ", " + ", " - ", " * ", " / ", "(", "#", "\r\n"):
        assert op in joined, f"no seed uses {op!r}"
    for unit in ("ms", "s", "m", "h", "d", "%", "Mi", "Gi", "MB", "KB", "TiB", "Ki", "m30s"):
        literal = rf"\d{re.escape(unit)}(?![A-Za-z])"
        assert re.search(literal, joined), f"no seed uses the unit {unit}"


# --- the mutation loop -------------------------------------------------------------------


def test_twenty_thousand_mutated_and_random_inputs() -> None:
    rng = random.Random(FUZZ_SEED)
    seen: set[str] = set()
    loaded = 0
    count = 0
    started = time.perf_counter()
    while count < MUTATED_INPUTS:
        text = mutant(rng)
        if text in seen:  # a repeated input tests nothing new; count distinct ones
            continue
        seen.add(text)
        count += 1
        try:
            loaded += not exercise(text, _snapshot_rng(FUZZ_SEED, count))
        except Exception as e:  # every exception is a finding: report it reproducibly
            pytest.fail(_finding(FUZZ_SEED, count, text, e), pytrace=False)
    elapsed = time.perf_counter() - started
    assert count == len(seen) >= MUTATED_INPUTS, "the loop must really run every input"
    # Mutants that still load exercise the evaluator; mutants that do not exercise
    # the diagnostics. A mutator drifting to either extreme tests half the front end.
    assert 0.05 * count < loaded < 0.7 * count, f"{loaded} of {count} mutants loaded"
    print(f"{count} inputs, {loaded} loaded, {elapsed:.1f}s, seed {FUZZ_SEED}")


def test_mutator_is_deterministic() -> None:
    """A failure report names a seed; the same seed must give the same inputs."""
    first = [mutant(random.Random(7)) for _ in range(3)]
    again = [mutant(random.Random(7)) for _ in range(3)]
    assert first == again
    assert len(set(mutant(random.Random(s)) for s in range(50))) > 40


# --- hypothesis: the structured part -----------------------------------------------------

_FUZZ_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_FUZZ_SETTINGS
@given(strategies.policies(max_rules=3), st.randoms(use_true_random=False), st.integers(0, 3))
def test_generated_policies_mutated(policy: Policy, rng: random.Random, n: int) -> None:
    text = format_policy(policy)
    assert exercise(text, rng) == [], "a generated policy must load before it is mutated"
    for _ in range(n):
        text = "".join(_mutate_tokens(rng, tokens_of(text)))
    exercise(text, rng)


@_FUZZ_SETTINGS
@given(
    strategies.raw_expressions(max_leaves=16),
    st.none() | st.sampled_from(["2m", "0s", "5%", "1"]),
    st.sampled_from(["rollback", "pause", "promote", "continue", "halt"]),
    st.randoms(use_true_random=False),
)
def test_any_expression_the_grammar_writes(
    expr: Expr, for_: str | None, action: str, rng: random.Random
) -> None:
    from dsl.format import format_expr

    rule = f"r: {format_expr(expr)}{f' for {for_}' if for_ else ''} -> {action}\n"
    exercise(rule, rng)


@_FUZZ_SETTINGS
@given(st.text(max_size=80), st.randoms(use_true_random=False))
def test_arbitrary_unicode_text(text: str, rng: random.Random) -> None:
    exercise(text, rng)


# --- deep nesting: each must end in diagnostics or a load, never a RecursionError ---------


def _run_hostile(text: str) -> bool:
    """Exercise one hostile input; True when it loaded."""
    return not exercise(text, random.Random(FUZZ_SEED))


def test_100000_opening_parentheses() -> None:
    assert not _run_hostile("(" * 100_000 + "p99 > 300ms -> rollback\n")


def test_10000_balanced_parentheses() -> None:
    # Parentheses only group: the tree stays one comparison deep, so this loads.
    assert _run_hostile("r: " + "(" * 10_000 + "p99 > 300ms" + ")" * 10_000 + " -> rollback\n")


def test_100000_closing_parentheses() -> None:
    assert not _run_hostile("p99 > 300ms" + ")" * 100_000 + " -> rollback\n")


def test_not_50000_times() -> None:
    assert not _run_hostile("not " * 50_000 + "p99 > 300ms -> rollback\n")


def test_unary_minus_50000_times() -> None:
    assert not _run_hostile("- " * 50_000 + "p99 > 300ms -> rollback\n")
    assert not _run_hostile("p99 > " + "-" * 50_000 + "300ms -> rollback\n")


def test_abs_nested_10000_deep() -> None:
    assert not _run_hostile("abs(" * 10_000 + "p99" + ")" * 10_000 + " > 300ms -> rollback\n")


def test_sum_of_100000_terms() -> None:
    assert not _run_hostile(" + ".join(["p99"] * 100_000) + " > 300ms -> rollback\n")


def test_and_of_100000_conditions() -> None:
    assert not _run_hostile(" and ".join(["p99 > 300ms"] * 100_000) + " -> rollback\n")


def test_count_windows_nested_5000_deep() -> None:
    text = "count(" * 5_000 + "p99 > 300ms" + ", 5m) > 0" * 5_000 + " -> rollback\n"
    assert not _run_hostile(text)
    unclosed = "count(" * 5_000 + "p99 > 300ms, 5m"
    assert not _run_hostile(unclosed)


def test_nesting_just_within_the_bound_loads() -> None:
    """Deep but legal input is not refused: a chain of 40 terms loads and evaluates."""
    assert _run_hostile("r: " + " + ".join(["p99"] * 40) + " > 300ms -> rollback\n")
    assert _run_hostile("r: " + "abs(" * 40 + "p99" + ")" * 40 + " > 300ms -> rollback\n")


# --- huge input ----------------------------------------------------------------------------


def test_two_megabyte_file() -> None:
    text = ("latency: p99 > 300ms for 2m -> rollback\n" * 60_000)[: 2 * 1024 * 1024]
    assert not _run_hostile(text), "a 2 MB policy is refused with a diagnostic"


def test_two_megabytes_of_multibyte_characters() -> None:
    assert not _run_hostile("# " + "\u00e9" * 1_100_000 + "\np99 > 300ms -> rollback\n")


def test_line_of_200000_characters() -> None:
    comment = "p99 > 300ms -> rollback # " + "x" * 200_000 + "\n"
    assert _run_hostile(comment)
    spaces = "p99 >" + " " * 200_000 + "300ms -> rollback\n"
    assert _run_hostile(spaces)
    long_name = "n" * 200_000 + ": p99 > 300ms -> rollback\n"
    assert _run_hostile(long_name)
    long_number = "p99 > " + "9" * 200_000 + "ms -> rollback\n"
    assert not _run_hostile(long_number)
    error_at_the_end = " " * 200_000 + "p99 > 5% -> rollback\n"
    assert not _run_hostile(error_at_the_end)
    garbage = "".join(random.Random(FUZZ_SEED).choice("(p9>)-% ") for _ in range(200_000))
    assert not _run_hostile(garbage)


def test_ten_thousand_broken_rules() -> None:
    text = "".join(f"r{i}: p99 > {i}% -> rollback\n" for i in range(10_000))
    diagnostics = exercise(text, random.Random(FUZZ_SEED))
    assert len(diagnostics) >= 10_000  # one per rule: every problem in one pass


def test_ten_thousand_rules() -> None:
    text = "".join(f"r{i}: p99 > {i + 1}ms for 1m -> rollback\n" for i in range(10_000))
    assert _run_hostile(text)


# --- positions in long lines and many diagnostics ------------------------------------------


def test_header_names_the_column_in_the_file_on_a_long_line() -> None:
    text = " " * 300 + "p99 > 5% -> rollback\n"
    (d,) = dsl.check_source(text)
    header = render(d, text, PATH).split("\n", 1)[0]
    assert header.startswith(f"{PATH}:1:{d.span.start + 1}: "), header


def test_policy_error_renders_many_diagnostics_quickly() -> None:
    # CPU time, not wall time, so a busy machine does not decide the outcome.
    # Linear rendering takes a few milliseconds here, quadratic most of a second.
    text = "".join(f"r{i}: p99 > 5% -> rollback\n" for i in range(1_000))
    with pytest.raises(dsl.PolicyError) as raised:
        dsl.load(text, PATH)
    started = time.process_time()
    rendered = raised.value.render()
    elapsed = time.process_time() - started
    assert rendered.count(f"{PATH}:") == 1_000
    assert elapsed < 0.1, f"rendering 1,000 diagnostics took {elapsed:.2f}s of CPU"


def test_template_with_many_placeholders_checks_quickly() -> None:
    # About 40ms of CPU when linear (20ms without placeholders); quadratic took 0.6s.
    body = " + ".join('x{a="{{namespace}}"}' for _ in range(4_000))
    text = f"metric m = promql `{body}` as duration\nm > 1s -> rollback\n"
    started = time.process_time()
    assert dsl.check_source(text) == []
    elapsed = time.process_time() - started
    assert elapsed < 0.25, f"checking 4,000 placeholders took {elapsed:.2f}s of CPU"


def test_syntax_error_quoting_a_query_stays_on_one_line() -> None:
    """A misplaced multi-line query is named, not quoted into the one-line header."""
    for text in ("`\n`", "p99 `a\nb` -> rollback\n", "p99 > 1s `" + "x\n" * 1000 + "` -> pause"):
        diagnostics = exercise(text, random.Random(FUZZ_SEED))
        assert diagnostics
        assert all(len(d.message) < 200 for d in diagnostics), diagnostics


# --- odd unicode ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("odd", "ascii"),
    [("３００ms", "300ms"), ("٣٠٠ms", "300ms"), ("\u0967\u0966s", "10s"), ("٣", "3")],
)
def test_unicode_digits_are_refused_or_mean_the_same_number(odd: str, ascii: str) -> None:
    """Either a diagnostic, or exactly the value the ASCII digits would have."""
    if ascii[-1].isalpha():
        text = f"latency: p99 > {odd} -> rollback\n"
    else:
        text = f"weight > {odd} -> pause\n"
    if _run_hostile(text):
        loaded = dsl.load(text).rules[0].node.condition
        same = dsl.load(text.replace(odd, ascii)).rules[0].node.condition
        assert isinstance(loaded, Binary) and isinstance(loaded.right, Number)
        assert isinstance(same, Binary) and isinstance(same.right, Number)
        got, want = loaded.right, same.right
        assert (got.value, got.dim, got.unit) == (want.value, want.dim, want.unit)


def test_every_odd_character_everywhere_in_a_policy() -> None:
    source = "latency: p99 > 300ms for 2m -> rollback\n"
    rng = random.Random(FUZZ_SEED)
    count = 0
    for odd in ODD_TEXT:
        for i in range(len(source) + 1):
            exercise(source[:i] + odd + source[i:], rng)
            count += 1
    assert count == len(ODD_TEXT) * (len(source) + 1)


# --- windows shorter than the resolution of `now` --------------------------------------------


@pytest.mark.parametrize(
    ("source", "now"),
    [
        ("avg(p99, 1e-300s) > 1s -> rollback\n", 1.0),
        ("count(p99 > 1s, 1e-7s) > 0 -> rollback\n", 1.7e9),  # a Unix time as `now`
        ("increase(restarts, 1E-310m) >= 3 -> rollback\n", 1e6),
    ],
)
def test_window_shorter_than_the_clock_resolution(source: str, now: float) -> None:
    """A tiny positive window is refused by the checker or holds the current evaluation."""
    if exercise(source, random.Random(FUZZ_SEED)):
        return  # refused with a diagnostic: fine
    policy = dsl.load(source)
    state = policy.new_state()
    for tick in range(3):
        verdict = policy.evaluate(now + tick, {"canary.p99": 2.0, "canary.restarts": 1.0}, state)
        assert verdict.trace()


# --- extreme snapshot values -----------------------------------------------------------------


def test_extreme_value_overflowing_a_product_is_explained() -> None:
    policy = dsl.load("p99 * 2 > 1s -> rollback\n")
    verdict = policy.evaluate(0.0, {"canary.p99": 1e308}, policy.new_state())
    assert verdict.action is Action.ROLLBACK
    assert verdict.explanation


def test_extreme_ratio_is_explained() -> None:
    # No arithmetic in the policy: showing a ratio as a percentage multiplies by 100.
    policy = dsl.load("error_rate > 1% -> rollback\n")
    verdict = policy.evaluate(0.0, {"canary.error_rate": 1e308}, policy.new_state())
    assert verdict.action is Action.ROLLBACK
    assert verdict.explanation


def test_extreme_values_in_every_seed_policy() -> None:
    rng = random.Random(FUZZ_SEED)
    for source in SEEDS:
        for _ in range(5):
            run_policy(dsl.load(source), rng, EXTREME_VALUES, ticks=6)


def test_largest_float_duration_is_explained() -> None:
    policy = dsl.load("p99 > 1s -> rollback\n")
    verdict = policy.evaluate(0.0, {"canary.p99": 1.7976931348623157e308}, policy.new_state())
    assert verdict.action is Action.ROLLBACK
    assert verdict.explanation


def test_extreme_values_of_every_kind_are_explained() -> None:
    """Every built-in metric and context value, at every extreme, fires and explains itself."""
    from dsl.builtins import CONTEXT, METRICS

    names = [*METRICS, *CONTEXT]
    source = "".join(f"r{i}: {name} != 0 or {name} == 0 -> pause\n" for i, name in enumerate(names))
    policy = dsl.load(source)
    keys = sorted(policy.metric_keys | policy.context_keys)
    state = policy.new_state()
    for i, value in enumerate(v for v in EXTREME_VALUES if v is not None):
        verdict = policy.evaluate(float(i), dict.fromkeys(keys, value), state)
        assert verdict.action is Action.PAUSE
        assert "\n" not in verdict.explanation
        assert verdict.trace().count("\n") == len(names) - 1


# --- the checks above can fail -------------------------------------------------------------


def _fails(d: Diagnostic, text: str) -> bool:
    try:
        check_diagnostic(d, text)
    except AssertionError:
        return True
    return False


def test_the_diagnostic_checks_catch_what_they_are_for() -> None:
    text = "p99 > 300ms -> rollback\n"
    span = Span(6, 11)
    assert not _fails(Diagnostic("E001", "expected a value", span), text)
    for bad in (
        Diagnostic("E001", "expected RPAR or QUANTITY", span),
        Diagnostic("E001", "expected one of: __ANON_3", span),
        Diagnostic("E001", "found Token('NAME', 'x')", span),
        Diagnostic("E001", "expected $END", span),
        Diagnostic("E001", "ok", span, label="matching (?:\\d+)"),
        Diagnostic("E001", "two\nlines", span),
        Diagnostic("E001", "ok", Span(len(text) + 5, len(text) + 6)),
    ):
        assert _fails(bad, text), bad
    # A rule the author named NAME may be quoted back.
    twice = "NAME: true -> pause\nNAME: true -> pause\n"
    assert not _fails(Diagnostic("E301", "the rule name `NAME` is used twice", span), twice)
