"""The REPL session's policy: loaded files and typed statements in, one compiled policy out.

`compose(files, typed)` reads the files as one policy, in order, each
statement typed at the prompt taking the place of the file's statement of the
same name (or following the files when it has no namesake). The `Composed`
text is what the session compiles; it remembers which stretch came from which
file or typed line, so a diagnostic points at the place the person wrote
(`checkout.rules:3:7`, `<repl>:1:5`), never into the composed text.

`load_files` (`:load`) and `add_statements` (a typed rule or metric) change
the session's policy through `install`, which compiles the new text, keeps
the old policy when it has errors, and replays the session's past
evaluations through the new one; each returns the text to print.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import dsl
from codedance.policy_files import FileProblem, UsageError, find_files, read_text
from codedance.repl_commands import ReplError, count
from dsl import ast
from dsl.ast import Span
from dsl.compile import CompiledRule
from dsl.diagnostics import Diagnostic, LineIndex, render
from dsl.parser import parse
from dsl.units import format_duration

if TYPE_CHECKING:
    from codedance.repl_session import Session

StatementKey = tuple[str, str]  # ("rule" | "metric", name)


def statement_key(statement: ast.Statement) -> StatementKey | None:
    """What a statement replaces: the rule or metric of its name (an unnamed rule, nothing)."""
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


def render_typed(diagnostics: Iterable[Diagnostic], source: str, shift: int = 0) -> str:
    """Diagnostics of typed text, at `<repl>`; `shift` moves them from a text they were found in."""
    index = LineIndex(source)
    out = []
    for d in diagnostics:
        if shift:
            d = replace(d, span=Span(max(0, d.span.start + shift), max(0, d.span.end + shift)))
        out.append(render(d, source, "<repl>", index))
    return "\n".join(out)


# ---------------------------------------------------------------- changing the session's policy


def install(
    session: Session, files: list[tuple[str, str]], typed: list[tuple[StatementKey | None, str]]
) -> None:
    """Make these files and statements the session's policy and replay the evaluations."""
    composed = compose(files, typed)
    try:
        policy = dsl.load(composed.text, "<session>")
    except dsl.PolicyError as e:
        raise ReplError("\n".join(composed.render(d) for d in e.diagnostics)) from None
    session.files, session.typed, session.composed, session.policy = files, typed, composed, policy
    session.state = policy.new_state()
    for tick in session.ticks:
        tick.verdict = policy.evaluate(tick.at, tick.snapshot, session.state)


def load_files(session: Session, paths: list[str]) -> str:
    """`:load [FILE...]`: read policy files (alone, re-read the loaded ones)."""
    if not paths:
        paths = [p for p, _ in session.files]
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
    files = list(session.files)
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
        lines.append(f"{verb} {path}: {count(len(labels), 'rule')} ({', '.join(labels)})")
    install(session, files, session.typed)
    return "\n".join(lines + _replayed(session))


def _replayed(session: Session) -> list[str]:
    if not session.ticks:
        return []
    last = session.ticks[-1]
    return [
        f"replayed {count(len(session.ticks), 'evaluation')}; "
        f"t={format_duration(last.at)}: {last.verdict.explanation}"
    ]


def add_statements(session: Session, entry: str, tree: ast.Policy) -> str:
    """Rules and metric definitions typed as `entry` join the policy, one after the other."""
    return "\n".join(_add_statement(session, entry, s) for s in tree.statements)


def _add_statement(session: Session, entry: str, statement: ast.Statement) -> str:
    text = entry[statement.span.start : statement.span.end]
    key = statement_key(statement)
    known = key is not None and any(
        statement_key(s) == key for s in session.policy.checked.policy.statements
    )
    typed = list(session.typed)
    at = next((i for i, (k, _) in enumerate(typed) if key is not None and k == key), None)
    if at is None:
        typed.append((key, text))
    else:
        typed[at] = (key, text)
    install(session, session.files, typed)
    verb = "replaced" if known else "added"
    if isinstance(statement, ast.MetricDef):
        said = f"{'redefined' if known else 'defined'} metric {statement.name}"
    else:
        rule = _typed_rule(session, key, text)
        said = f"{verb} rule {rule.label} (-> {rule.action.value})"
    return "\n".join([said, *_replayed(session)])


def _typed_rule(session: Session, key: StatementKey | None, text: str) -> CompiledRule:
    if key is not None:
        return next(r for r in session.policy.rules if r.label == key[1])
    # an unnamed rule is the last typed piece with this text: its label is `line N`
    for r in reversed(session.policy.rules):
        piece = session.composed.piece_at(r.node.span.start)
        if piece is not None and piece.origin == "<repl>" and piece.source == text:
            return r
    raise ReplError("the rule was added but cannot be found")  # pragma: no cover
