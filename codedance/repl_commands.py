"""The REPL's commands as a person reads them, and how their arguments are read.

In: the text after a command's name (`2m30s` of `:advance 2m30s`, the file
of `:save FILE`). Out: seconds, words, or a `ReplError` whose one-line text
the session shows as it is. `COMMANDS` is every command with its help line:
`:help` prints them and the completer offers their names; the session maps
each name to what it does.
"""

from __future__ import annotations

import shlex

from dsl.ast import Dim
from dsl.units import UnitError, parse_quantity

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

HELP = "\n".join(
    [
        "Type a rule to add it (`latency: p99 > 300ms for 2m -> rollback`; the same name",
        "replaces it), a value (`canary.p99 = 350ms`, `p99 = 0.35`, `weight = 25`, `p99 = _`),",
        "or any expression to see its value (`canary.p99 / stable.p99`). Commands:",
        *(f"  {text}" for name, text in COMMANDS.items()),
        "Series values are in base units (seconds, 0..1 ratios, bytes), as in test files.",
    ]
)


class ReplError(Exception):
    """A problem with one entry; its text (one line, or diagnostics) is shown as it is."""


def duration(text: str, what: str) -> float:
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


def words(args: str) -> list[str]:
    """The arguments split as a shell would, so a file name may be quoted."""
    try:
        return shlex.split(args)
    except ValueError as e:
        raise ReplError(f"cannot read the arguments: {e}") from None


def count(n: int, word: str) -> str:
    """`1 rule`, `3 rules`."""
    return f"{n} {word}{'' if n == 1 else 's'}"
