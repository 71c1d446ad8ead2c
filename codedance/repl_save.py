"""`:save FILE`: a REPL session in, a policy test file (LANGUAGE.md section 8) out.

The test file's input series are the snapshots the session's evaluations
recorded (a context value that never changed becomes `context`, a metric
nobody set stays unknown by being left out), and its expectations pin the
verdicts: the first and last evaluations and both sides of every change.
It names the loaded policy file when the session has exactly that file,
unchanged on disk; otherwise the session's rules are written next to the test
as `NAME.rules`. Nothing existing is overwritten, except files this session
wrote itself, and the written file is run at once through the same runner as
`codedance test`, so the message says whether it passes.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

from codedance.policy_files import FileProblem, YamlDocument, read_text
from codedance.policytest_text import duration_text, number_text, series_text
from codedance.repl_commands import ReplError, count, words
from dsl.builtins import CONTEXT

if TYPE_CHECKING:
    from codedance.repl_session import Session
    from codedance.repl_values import Tick


def save(session: Session, args: str) -> str:
    """Write the test file (and the rules it needs); what was written and whether it passes."""
    given = words(args)
    if len(given) != 1:
        raise ReplError("write `:save FILE`, such as `:save checkout_session_test.yaml`")
    path = given[0]
    if not session.ticks:
        raise ReplError("nothing to pin yet: run evaluations with `:tick` or `:advance` first")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ReplError(f"{path}: no such directory {directory}")
    if os.path.exists(path) and os.path.realpath(path) not in session.saved:
        raise ReplError(f"{path} exists; choose another name (the session never overwrites it)")
    rule_file, rules_text = _rule_file_for(session, path)
    test_text = _test_text(session, os.path.relpath(rule_file, directory))
    try:
        if rules_text is not None:
            with open(rule_file, "w", encoding="utf-8") as f:
                f.write(rules_text)
        with open(path, "w", encoding="utf-8") as f:
            f.write(test_text)
    except OSError as e:
        raise ReplError(f"{path}: cannot write: {e.strerror or e}") from None
    written = [path] if rules_text is None else [path, rule_file]
    session.saved.update(os.path.realpath(p) for p in written)
    said = f"wrote {' and '.join(written)}; {_verify(path, test_text)}"
    if not re.search(r"_test\.ya?ml$", path):
        said += "\n(`codedance test DIR` finds test files named *_test.yaml)"
    return said


def _rule_file_for(session: Session, path: str) -> tuple[str, str | None]:
    """The policy file the test names, and its text when it must be written (else None)."""
    if len(session.files) == 1 and not session.typed:
        loaded, text = session.files[0]
        try:
            unchanged = read_text(loaded) == text
        except FileProblem:
            unchanged = False
        if unchanged:
            return loaded, None
    stem = re.sub(r"\.ya?ml$", "", path)
    rule_file = stem + ".rules"
    loaded_paths = {os.path.realpath(p) for p, _ in session.files}
    if os.path.realpath(rule_file) in loaded_paths:
        raise ReplError(f"saving would overwrite the loaded {rule_file}; choose another name")
    if os.path.exists(rule_file) and os.path.realpath(rule_file) not in session.saved:
        raise ReplError(f"{rule_file} exists; choose another name for the test file")
    return rule_file, session.composed.text


def _test_text(session: Session, rule_file: str) -> str:
    context, series = _recorded_inputs(session)
    lines = [
        "# Written by `codedance repl` (:save): the verdicts of an exploration, pinned.",
        f"rule_files: [{json.dumps(rule_file)}]",
        f"evaluation_interval: {duration_text(session.interval)}",
        "tests:",
        '  - name: "repl session"',
    ]
    if context:
        values = ", ".join(f"{k}: {number_text(v)}" for k, v in context.items())
        lines.append(f"    context: {{{values}}}")
    lines.append("    input_series:" + ("" if series else " []"))
    for key, values_text in series.items():
        lines += [f"      - series: {key}", f"        values: {json.dumps(values_text)}"]
    lines.append("    expect:")
    for tick in _pinned(session.ticks):
        lines += [
            f"      - at: {duration_text(tick.at)}",
            f"        action: {tick.verdict.action.value}",
        ]
        if tick.verdict.rule is not None:
            lines.append(f"        rule: {json.dumps(tick.verdict.rule)}")
    return "\n".join(lines) + "\n"


def _recorded_inputs(session: Session) -> tuple[dict[str, float], dict[str, str]]:
    """What the evaluations saw, as a test file's `context` and `input_series`."""
    ticks = session.ticks
    read = session.policy.metric_keys | session.policy.context_keys
    context: dict[str, float] = {}
    series: dict[str, str] = {}
    for key in sorted(read):
        values = [t.snapshot.get(key) for t in ticks]
        if key in CONTEXT:
            defaults = [t.at if key in ("elapsed", "step_elapsed") else 0.0 for t in ticks]
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


def _pinned(ticks: list[Tick]) -> list[Tick]:
    """The first and last evaluations, and both sides of every change of verdict."""
    keys = [(t.verdict.action, t.verdict.rule) for t in ticks]
    pins = {0, len(keys) - 1}
    for i in range(1, len(keys)):
        if keys[i] != keys[i - 1]:
            pins.update((i - 1, i))
    return [ticks[i] for i in sorted(pins)]


def _verify(path: str, text: str) -> str:
    """Whether `codedance test` passes the file just written, in a few words."""
    from engine.policytest import run_test_file

    # read as `codedance test` reads it, with the loader that refuses a key written twice
    result = run_test_file(path, YamlDocument(path, text).data)
    if result.status == "passed":
        expected = sum(1 for line in text.splitlines() if line.strip().startswith("- at:"))
        return f"{count(expected, 'expectation')}, and `codedance test` passes"
    problems = [p.describe() for p in result.problems] + [
        f.headline() for c in result.cases for f in c.failures
    ] + [p.describe() for c in result.cases for p in c.problems]
    return "but `codedance test` does not pass it: " + "; ".join(problems)
