"""`codedance repl`: the policy REPL, in a terminal or over piped lines.

    codedance repl [FILE...] [--prometheus URL] [--rollout NAMESPACE/NAME]
                   [--canary NAME] [--provider istio|nginx|plain] [--history FILE]

In: policy files, and lines typed at the prompt or piped to stdin. Out: the
session's answers on stdout; the exit code is 0, or 1 when a piped line
failed. What a line means is the business of `codedance.repl_session.Session`,
which knows nothing of terminals; this module wraps it in prompt_toolkit:

- completion from the grammar: Lark's interactive parser is fed the text
  before the cursor and `accepts()` says which terminals may come next (after
  `p99 > 300ms` that is `->`, `for`, `and`, ...; after `->` a name, which is
  then one of the four actions), and from the names the session knows:
  metrics (after `canary.` too), context values, functions, rules for
  `:explain`, the commands, paths for `:load` and `:save`;
- highlighting by the grammar's own tokens (`PolicyLexer`);
- history in a file (`~/.codedance_history` unless `--history`);
- a second prompt, `... `, while an entry ends too early (an open `(`, a
  trailing operator or `->`); an empty line ends it as it is.

When stdin or stdout is not a terminal, lines are read plainly, without
prompts or line editing, so a script can drive the REPL.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lark.exceptions import UnexpectedCharacters
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.lexers import Lexer
from prompt_toolkit.styles import Style

from codedance.policy_files import UsageError
from codedance.repl_commands import COMMANDS
from codedance.repl_session import CONTINUATION, PROMPT, Session
from dsl.builtins import ACTIONS, CONTEXT, FUNCTIONS, METRICS, TRACKS, UNIT_NAMES
from dsl.parser import _lark

if TYPE_CHECKING:
    from adapters.metrics.prometheus import SyncPrometheus

DEFAULT_HISTORY = "~/.codedance_history"
BANNER = "codedance repl: type a rule, a value, an expression or :help; Ctrl-D leaves"

Write = Callable[[str], None]


def add_command(commands: Any) -> None:
    repl = commands.add_parser(
        "repl",
        help="try policies on made-up, recorded or live metrics",
        description="Load policies, set values and series, advance fake time and watch "
        "each rule decide; `:save` turns the session into a policy test.",
    )
    repl.add_argument("files", nargs="*", metavar="FILE", help=".rules file or directory")
    repl.add_argument("--prometheus", metavar="URL", help="for :query and :pull")
    repl.add_argument(
        "--rollout",
        metavar="NAMESPACE/NAME",
        help="the stable workload whose metrics :pull reads (the canary is NAME-canary)",
    )
    repl.add_argument("--canary", metavar="NAME", help="the canary workload, if not NAME-canary")
    repl.add_argument(
        "--provider",
        choices=["istio", "nginx", "plain"],
        default="plain",
        help="whose metric queries :pull uses (default plain)",
    )
    repl.add_argument(
        "--history", metavar="FILE", default=None, help=f"default {DEFAULT_HISTORY}"
    )
    repl.set_defaults(run=run_repl)


def run_repl(args: argparse.Namespace) -> int:
    session = Session(
        prometheus=_prometheus(args.prometheus, args.provider),
        rollout=_rollout(args.rollout),
        canary=args.canary,
    )

    def write(text: str) -> None:
        print(text, flush=True)

    if args.files:
        loaded = session.load(args.files)
        if loaded:
            write(loaded)
    if sys.stdin.isatty() and sys.stdout.isatty():
        return interactive(session, _history(args.history, write), write)
    return batch(session, sys.stdin, write)


def _prometheus(url: str | None, provider: str) -> SyncPrometheus | None:
    if url is None:
        return None
    from adapters.metrics.catalog import catalog_for
    from adapters.metrics.prometheus import SyncPrometheus

    try:
        return SyncPrometheus(url, catalog_for(provider), timeout=10.0, retries=1)
    except ValueError as e:
        raise UsageError(f"--prometheus: {e}") from None


def _rollout(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise UsageError(f"--rollout {text}: write NAMESPACE/NAME, such as shop/checkout")
    return namespace, name


def _history(path: str | None, write: Write) -> History:
    """A history file, or one in memory (and a word why) when the file cannot be written."""
    target = os.path.expanduser(path or DEFAULT_HISTORY)
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as e:
        write(f"history is not kept: cannot write {target}: {e.strerror or e}")
        return InMemoryHistory()
    return FileHistory(target)


# ---------------------------------------------------------------- the two loops


def batch(session: Session, lines: Iterable[str], write: Write) -> int:
    """Feed lines as they come; 1 when any of them failed."""
    for line in lines:
        out = session.feed(line.rstrip("\r\n"))
        if out:
            write(out)
        if session.finished:
            break
    out = session.flush()
    if out:
        write(out)
    return 1 if session.failures else 0


def interactive(session: Session, history: History, write: Write) -> int:
    """The prompt loop; returns at `:quit` or Ctrl-D."""
    prompt: PromptSession[str] = PromptSession(
        history=history,
        completer=ReplCompleter(session),
        lexer=PolicyLexer(session),
        style=STYLE,
        multiline=True,
        prompt_continuation=lambda width, line, soft_wrap: CONTINUATION.rjust(width),
        key_bindings=_key_bindings(session),
        complete_while_typing=True,
    )
    write(BANNER)
    while not session.finished:
        try:
            text = prompt.prompt(PROMPT)
        except KeyboardInterrupt:
            continue  # Ctrl-C drops the line being typed, as in a shell
        except EOFError:
            break
        try:
            out = session.run(text)
        except KeyboardInterrupt:  # a long :advance or :pull, stopped by the person
            out = "interrupted"
        if out:
            write(out)
    return 0


def _key_bindings(session: Session) -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)
        elif session.incomplete(buffer.text):
            buffer.insert_text("\n")  # the second prompt: the entry goes on
        else:
            buffer.validate_and_handle()

    return bindings


# ---------------------------------------------------------------- completion


@dataclass(frozen=True, slots=True)
class Candidate:
    """A completion: the text to insert, how many characters before the cursor it replaces."""

    text: str
    replaces: int
    meta: str = ""


# Terminals a person types as words, in the order they are offered.
_WORDS: dict[str, tuple[str, ...]] = {
    "ARROW": ("->",),
    "FOR": ("for",),
    "AND": ("and",),
    "OR": ("or",),
    "COMPARE": (">", ">=", "<", "<=", "==", "!="),
    "NOT": ("not",),
    "TRUE": ("true",),
    "FALSE": ("false",),
    "LAST": ("last",),
    "METRIC": ("metric",),
    "PROMQL": ("promql",),
    "AS": ("as",),
}
_META = {
    "->": "then the action",
    "for": "how long it must hold",
    "rollback": "send all traffic back to stable",
    "pause": "hold the current weight",
    "promote": "skip the remaining steps",
    "continue": "go on with the next step",
}
_NAME_END = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_ASSIGNED = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?\s*=(?!=)")


def candidates(session: Session, text: str) -> list[Candidate]:
    """What may come next after `text`, the text before the cursor."""
    text = text.replace("\n", " ")
    if "#" in text and "`" not in text:
        return []  # inside a comment
    if text.lstrip().startswith(":"):
        return _command_candidates(session, text.lstrip())
    assigned = _ASSIGNED.match(text)
    if assigned is None:
        return _grammar_candidates(session, text)
    # the right of `=` is a value: it never goes on with `for` or `-> ACTION`
    found = _grammar_candidates(session, text[assigned.end() :])
    return [c for c in found if c.text not in ("->", "for")]


def _accepts(text: str) -> tuple[set[str], str | None] | None:
    """The terminals the grammar takes after `text`, and the type of its last token."""
    try:
        parser = _lark().parse_interactive(text)
        last = None
        for token in parser.iter_parse():
            last = token.type
        accepted: set[str] = parser.accepts()  # type: ignore[no-untyped-call]
        return accepted, last
    except Exception:  # a syntax error, or a literal the tree builder refuses: no completion
        return None


def _grammar_candidates(session: Session, text: str) -> list[Candidate]:
    m = _NAME_END.search(text)
    word = m.group() if m else ""
    before = text[: len(text) - len(word)]
    if (word and before[-1:].isdigit()) or (not word and text[-1:].isdigit()):
        return []  # a number being written, or its unit (`300m`)
    if not word and text.endswith("-") and not text.endswith("->"):
        found = _accepts(text[:-1])
        if found is not None and "ARROW" in found[0]:
            return [Candidate("->", 1, _META["->"])]
        return []
    found = _accepts(before)
    if found is None:
        return []
    accepted, last = found
    out = [
        Candidate(w, len(word), _META.get(w, ""))
        for terminal, words in _WORDS.items()
        if terminal in accepted
        for w in words
    ]
    if "NAME" in accepted:
        out += [Candidate(t, len(word), meta) for t, meta in _names(session, last)]
    return [c for c in out if c.text.startswith(word) and c.text != word]


def _names(session: Session, last: str | None) -> list[tuple[str, str]]:
    """The names that fit after a token of type `last`."""
    if last == "ARROW":
        return [(a, _META[a]) for a in ACTIONS]
    if last == "DOT":
        return _metrics(session)
    if last == "AS":
        return [(u, "unit") for u in UNIT_NAMES]
    if last == "METRIC":
        return []  # a new name
    return [
        *_metrics(session),
        *((name, info.meaning) for name, info in CONTEXT.items()),
        *((f"{name}(", info.signature) for name, info in FUNCTIONS.items()),
        *((f"{track}.", "track") for track in TRACKS),
    ]


def _metrics(session: Session) -> list[tuple[str, str]]:
    out = []
    for name in session.metric_names():
        info = METRICS.get(name)
        dim = session.metric_dim(name)
        out.append((name, info.meaning if info else f"defined metric ({dim.value if dim else ''})"))
    return out


def _command_candidates(session: Session, text: str) -> list[Candidate]:
    name, space, rest = text.partition(" ")
    if not space:
        return [
            Candidate(c, len(name), help.split("  ")[-1].strip())
            for c, help in COMMANDS.items()
            if c.startswith(name)
        ]
    arg = rest.lstrip()
    if name == ":explain":
        return [Candidate(r, len(arg), "rule") for r in session.rule_labels() if r.startswith(arg)]
    if name in (":series", ":pull") and " " not in arg:
        keys = [f"{t}.{m}" for t in TRACKS for m in session.metric_names()]
        if name == ":series":
            keys += list(CONTEXT)
        return [Candidate(k, len(arg)) for k in keys if k.startswith(arg)]
    return []


class ReplCompleter(Completer):
    """prompt_toolkit's side of `candidates`, plus file paths for `:load` and `:save`."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.paths = PathCompleter(expanduser=True)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        text = document.text_before_cursor
        command = text.lstrip().split(" ", 1)[0]
        if command in (":load", ":save") and " " in text.lstrip():
            last = text.rsplit(" ", 1)[-1]
            yield from self.paths.get_completions(Document(last), complete_event)
            return
        for c in candidates(self.session, text):
            yield Completion(c.text, -c.replaces, display_meta=c.meta or None)


# ---------------------------------------------------------------- highlighting


STYLE = Style.from_dict(
    {
        "keyword": "bold #af87ff",
        "number": "#00afaf",
        "metric": "#5fafff",
        "track": "#5f87d7",
        "function": "#ffaf00",
        "rule": "bold",
        "arrow": "bold",
        "operator": "#bcbcbc",
        "action.rollback": "bold #ff5f5f",
        "action.pause": "bold #ffd75f",
        "action.promote": "bold #5fd75f",
        "action.continue": "bold #bcbcbc",
        "query": "#87af87",
        "comment": "italic #808080",
        "command": "bold #ff87d7",
        "error": "bg:#870000 #ffffff",
    }
)

_TOKEN_STYLE = {
    **{k: "class:keyword" for k in _WORDS if k not in ("ARROW", "COMPARE")},
    "QUANTITY": "class:number",
    "ARROW": "class:arrow",
    "COMPARE": "class:operator",
    "PLUS": "class:operator",
    "MINUS": "class:operator",
    "STAR": "class:operator",
    "SLASH": "class:operator",
    "EQUALS": "class:operator",
    "TEMPLATE": "class:query",
    "COMMENT": "class:comment",
    "ERROR": "class:error",
}


def tokens(line: str) -> list[tuple[str, str]]:
    """The line as (terminal type, text) pairs, whitespace included; `ERROR` for a stray char."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        try:
            for tok in _lark().lex(line[pos:], dont_ignore=True):
                out.append((tok.type, str(tok)))
            break
        except UnexpectedCharacters as e:
            bad = pos + (e.pos_in_stream or 0)
            out.append(("ERROR", line[bad]))
            pos = bad + 1
    return out


def highlight(line: str, session: Session | None = None) -> StyleAndTextTuples:
    """Style and text fragments for one line of input."""
    stripped = line.lstrip()
    if stripped.startswith(":"):
        name, space, rest = stripped.partition(" ")
        indent = line[: len(line) - len(stripped)]
        return [("", indent), ("class:command", name), ("", space + rest)]
    pairs = tokens(line)
    styles = [_TOKEN_STYLE.get(kind, "") for kind, _ in pairs]
    # a name's style depends on its neighbours, whitespace and comments aside
    significant = [i for i, (kind, _) in enumerate(pairs) if kind not in ("WS", "COMMENT")]
    known = set(session.metric_names()) if session is not None else set(METRICS)
    for n, i in enumerate(significant):
        kind, text = pairs[i]
        if kind == "NAME":
            before = pairs[significant[n - 1]][0] if n else None
            after = pairs[significant[n + 1]][0] if n + 1 < len(significant) else None
            styles[i] = _name_style(text, before, after, first=n == 0, known=known)
    return [(style, text) for style, (_, text) in zip(styles, pairs, strict=True)]


def _name_style(text: str, before: str | None, after: str | None, *, first: bool,
                known: set[str]) -> str:
    if before == "ARROW":
        return f"class:action.{text}" if text in ACTIONS else "class:error"
    if after == "LPAR":
        return "class:function"
    if after == "COLON" and first:
        return "class:rule"
    if after == "DOT":
        return "class:track"
    if before == "DOT" or text in known or text in CONTEXT:
        return "class:metric"
    return ""


class PolicyLexer(Lexer):
    """Highlights input with the grammar's own tokens."""

    def __init__(self, session: Session | None = None) -> None:
        self.session = session

    def lex_document(self, document: Document) -> Callable[[int], StyleAndTextTuples]:
        lines = document.lines

        def line(number: int) -> StyleAndTextTuples:
            if number >= len(lines):
                return []
            return highlight(lines[number], self.session)

        return line
