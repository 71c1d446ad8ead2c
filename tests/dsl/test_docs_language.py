"""docs/language.md agrees with the language as implemented.

The reference shows policies in fenced blocks (its introduction states the
convention), and these tests hold every block to the code so that the
document cannot drift:

- a ```rules block is a complete policy: it loads without errors and is in
  canonical form (`dsl.format.format_policy`);
- a ```rules-error block is a policy with a mistake, followed by a
  ```diagnostics block holding exactly what `dsl.check_source` and
  `dsl.diagnostics.render` give for it as the file `policy.rules`
  (diagnostics separated by a blank line, as `codedance check` prints them);
- every code in `dsl.diagnostics.CODES` has an entry `### CODE: summary`, with
  at least one bad example that reports that code;
- the tables of metrics, context values, functions, placeholders and unit
  names list exactly the names of `dsl.builtins` and `dsl.promql`, and the
  window limits quoted are those of `dsl.builtins`;
- the `for` timeline, the explanations, the trace and the test-file example
  show what the evaluator and the test runner give for the scenario the text
  describes.

After a deliberate change to a diagnostic, regenerate the ```diagnostics
blocks with `python -m tests.dsl.test_docs_language --write` and review the
diff.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import dsl
from dsl.builtins import CONTEXT, FUNCTIONS, MAX_LAST_N, MAX_WINDOW_SECONDS, METRICS, UNIT_NAMES
from dsl.compile import CompiledPolicy
from dsl.diagnostics import CODES, LineIndex, render
from dsl.format import format_policy
from dsl.parser import parse
from dsl.promql import PLACEHOLDERS
from dsl.runtime import Verdict
from dsl.units import format_duration, parse_quantity
from engine.policytest import run_test_file

DOC = Path(__file__).resolve().parents[2] / "docs" / "language.md"
EXAMPLE_PATH = "policy.rules"
_FENCE = re.compile(r"^```(\S*)$")
_CODE_HEADING = re.compile(r"^### (E\d{3}): (.+)$")


@dataclass(frozen=True)
class Block:
    """A fenced block: its info string, its text, its opening line, its section."""

    info: str
    text: str
    line: int  # 1-based line of the opening fence
    section: str  # the nearest heading above it


def blocks(doc: str) -> list[Block]:
    """Every fenced block of a Markdown document, in order."""
    found: list[Block] = []
    section = ""
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            if lines[i].startswith("#"):
                section = lines[i]
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"docs/language.md:{start + 1}: the block is never closed")
        found.append(Block(fence.group(1), "".join(f"{x}\n" for x in body), start + 1, section))
        i += 1
    return found


def diagnostics_text(source: str) -> str:
    """What the reference shows for a bad example: every diagnostic, rendered."""
    index = LineIndex(source)
    rendered = [render(d, source, EXAMPLE_PATH, index) for d in dsl.check_source(source)]
    return "\n\n".join(rendered) + "\n"


def error_examples(all_blocks: list[Block]) -> Iterator[tuple[Block, Block | None]]:
    """Each ```rules-error block with the block after it (None at the end)."""
    for i, block in enumerate(all_blocks):
        if block.info == "rules-error":
            yield block, all_blocks[i + 1] if i + 1 < len(all_blocks) else None


def write_diagnostics(doc: str) -> str:
    """The document with the ```diagnostics block after every bad example regenerated."""
    lines = doc.splitlines(keepends=True)
    for block, output in reversed(list(error_examples(blocks(doc)))):
        assert output is not None and output.info == "diagnostics", f"line {block.line}"
        body = output.text.count("\n")
        lines[output.line : output.line + body] = [diagnostics_text(block.text)]
    return "".join(lines)


def first_column(doc: str, marker: str) -> list[str]:
    """The first column, without backticks, of the first table after `marker`."""
    names: list[str] = []
    in_table = False
    for line in doc[doc.index(marker) :].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            if line.startswith("| `"):
                names.append(line.split("|")[1].strip().strip("`"))
        elif in_table:
            break
    return names


def _section(doc: str, heading: str) -> str:
    start = doc.index(f"\n{heading}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


TEXT = DOC.read_text(encoding="utf-8")
ALL_BLOCKS = blocks(TEXT)
RULES = [b for b in ALL_BLOCKS if b.info == "rules"]
ERRORS = list(error_examples(ALL_BLOCKS))
OVERVIEW = RULES[0]


def _id(block: Block | None) -> str:
    return f"line {block.line}" if block is not None else "-"


# ---------------------------------------------------------------- examples


def test_there_are_examples_to_check() -> None:
    # A broken fence convention would otherwise make the parametrized tests vanish.
    assert len(RULES) >= 4
    assert len(ERRORS) >= len(CODES)
    assert OVERVIEW.section == "## Overview"


@pytest.mark.parametrize("block", RULES, ids=_id)
def test_rules_block_loads_and_is_canonical(block: Block) -> None:
    try:
        dsl.load(block.text, EXAMPLE_PATH)
    except dsl.PolicyError as e:
        pytest.fail(f"docs/language.md {_id(block)} does not load:\n{e.render()}")
    tree, _ = parse(block.text)
    assert tree is not None
    assert format_policy(tree, block.text) == block.text, "not in canonical form"


@pytest.mark.parametrize(("block", "output"), ERRORS, ids=_id)
def test_bad_example_shows_the_real_diagnostics(block: Block, output: Block | None) -> None:
    assert output is not None and output.info == "diagnostics", (
        f"{_id(block)}: a ```rules-error block must be followed by a ```diagnostics block"
    )
    assert output.text == diagnostics_text(block.text)


# ---------------------------------------------------------------- error codes


def test_every_code_has_an_entry_with_its_summary() -> None:
    headings = {
        m.group(1): m.group(2)
        for m in (_CODE_HEADING.match(line) for line in TEXT.splitlines())
        if m is not None
    }
    missing = [code for code in CODES if code not in headings]
    assert not missing, f"codes without a `### CODE: summary` entry: {missing}"
    wrong = {c: s for c, s in headings.items() if CODES.get(c) != s}
    assert not wrong, f"entries whose code is unknown or whose summary is not CODES': {wrong}"


def test_every_code_has_a_bad_example_that_reports_it() -> None:
    shown: set[str] = set()
    for block, _ in ERRORS:
        m = _CODE_HEADING.match(block.section)
        assert m is not None, f"{_id(block)}: a bad example outside an error-code entry"
        codes = {d.code for d in dsl.check_source(block.text)}
        assert m.group(1) in codes, f"{_id(block)} under {m.group(1)} reports {sorted(codes)}"
        shown.add(m.group(1))
    assert sorted(shown) == sorted(CODES)


# ---------------------------------------------------------------- tables


def test_metric_and_context_tables_list_the_builtins() -> None:
    assert first_column(TEXT, "\n## Metrics and context values\n") == list(METRICS)
    assert first_column(TEXT, "\nContext values describe") == list(CONTEXT)


def test_function_table_lists_every_function() -> None:
    expected = [f.signature for f in FUNCTIONS.values()]
    assert first_column(TEXT, "\n## Functions and windows\n") == expected


def test_placeholder_and_unit_tables_list_what_exists() -> None:
    section = _section(TEXT, "## Metric definitions")
    placeholders = ["{{" + name + "}}" for name in PLACEHOLDERS]
    assert first_column(section, "| placeholder |") == placeholders
    assert first_column(section, "| unit | kind |") == list(UNIT_NAMES)


def test_window_limits_are_the_real_ones() -> None:
    text = " ".join(_section(TEXT, "## Functions and windows").split())
    limits = f"at most {format_duration(MAX_WINDOW_SECONDS)} (24 hours) and a `last N` window "
    assert limits + f"at most `last {MAX_LAST_N}`" in text
    assert MAX_WINDOW_SECONDS == 24 * 3600


# ---------------------------------------------------------------- evaluation


def _evaluate(
    policy: CompiledPolicy, snapshots: Mapping[float, Mapping[str, float | None]]
) -> dict[float, Verdict]:
    state = policy.new_state()
    return {t: policy.evaluate(t, snapshot, state) for t, snapshot in snapshots.items()}


def test_for_timeline_is_the_evaluators() -> None:
    p99: dict[float, float | None] = {0: 0.12, 30: 0.35, 60: 0.36, 90: None, 120: 0.4}
    p99.update({float(t): 0.41 for t in range(150, 241, 30)})
    p99[270] = 0.2
    verdicts = _evaluate(
        dsl.load("p99 > 300ms for 2m -> rollback"),
        {t: {"canary.p99": v} for t, v in p99.items()},
    )
    section = _section(TEXT, "## `for`: pending and firing")
    rows = [line.split("|")[1:-1] for line in section.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) >= 6
    for at, shown_p99, condition, _state, action in (map(str.strip, r) for r in rows):
        t = parse_quantity(at)[0] if at != "0s" else 0.0
        value = None if shown_p99 == "no sample" else parse_quantity(shown_p99)[0]
        assert p99[t] == value, at
        verdict = verdicts[t]
        assert condition == {True: "true", False: "false", None: "unknown"}[
            verdict.conditions[0]
        ], at
        assert action == verdict.action.value, at


_HEALTHY: dict[str, float | None] = {
    "stable.p99": 0.2,
    "canary.error_rate": 0.002,
    "canary.success_rate": 0.998,
    "canary.failed_pods": 0.0,
    "canary.restarts": 0.0,
    "weight": 25.0,
}


def _overview_at(until: int, snapshot: Mapping[str, float | None]) -> Verdict:
    policy = dsl.load(OVERVIEW.text, "checkout.rules")
    verdicts = _evaluate(policy, {float(t): snapshot for t in range(0, until + 1, 30)})
    return verdicts[float(until)]


def test_explanation_and_trace_are_the_evaluators() -> None:
    verdict = _overview_at(120, {**_HEALTHY, "canary.p99": 0.412})
    section = _section(TEXT, "## Explanations")
    assert f"```text\n{verdict.explanation}\n```" in section
    assert f"```text\n{verdict.trace()}\n```" in section
    assert f"The health score is {verdict.health:g}." in " ".join(section.split())


def test_explanation_of_an_and_is_the_evaluators() -> None:
    verdict = _overview_at(180, {**_HEALTHY, "canary.p99": 0.26, "stable.p99": 0.15})
    assert verdict.rule == "relative"
    assert f"```text\n{verdict.explanation}\n```" in _section(TEXT, "## Explanations")


def _test_file_example() -> dict[str, Any]:
    example = next(b for b in ALL_BLOCKS if b.info == "yaml" and "rule_files:" in b.text)
    data = yaml.safe_load(example.text)
    assert isinstance(data, dict)
    return data


def test_test_file_example_passes(tmp_path: Path) -> None:
    data = _test_file_example()
    (tmp_path / data["rule_files"][0]).write_text(OVERVIEW.text, encoding="utf-8")
    result = run_test_file(tmp_path / "checkout_test.yaml", data)
    assert result.status == "passed", result


def test_failed_test_output_is_the_runners(tmp_path: Path) -> None:
    data = _test_file_example()
    data["tests"][0]["expect"][1]["at"] = "3m30s"  # one tick early, as the text says
    (tmp_path / data["rule_files"][0]).write_text(OVERVIEW.text, encoding="utf-8")
    case = run_test_file(tmp_path / "checkout_test.yaml", data).cases[0]
    (failure,) = case.failures
    shown = "\n".join("    " + line for line in failure.describe().splitlines())
    section = _section(TEXT, "## Policy tests and the command line")
    assert f"  FAIL {case.name}\n{shown}\n" in section


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.dsl.test_docs_language --write")
    DOC.write_text(write_diagnostics(TEXT), encoding="utf-8")
