"""The syntax tree of a policy: frozen dataclasses built by the parser.

In: nothing (the parser constructs these). Out: a `Policy` holding `Rule` and
`MetricDef` statements whose conditions are `Expr` trees.

Every node carries a `Span` (character offsets into the source) that is left
out of equality and hashing, so two nodes written the same way compare equal
wherever they stand. The compiler relies on that to share one window between
identical `avg(p99, 5m)` calls, and the property tests rely on it to compare a
parsed tree with a formatted-then-reparsed one.

Each node also records its `depth`. The parser refuses trees deeper than a
fixed bound, so every later stage may recurse without meeting Python's
recursion limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class Span:
    """Half-open character range [start, end) in the policy source."""

    start: int
    end: int

    def cover(self, other: Span) -> Span:
        return Span(min(self.start, other.start), max(self.end, other.end))


NO_SPAN = Span(0, 0)


class Dim(Enum):
    """The kind of quantity a value is; the checker's types."""

    NUMBER = "number"
    COUNT = "count"
    DURATION = "duration"
    RATIO = "ratio"
    BYTES = "bytes"
    RATE = "per second"
    CORES = "cores"
    BOOL = "boolean"


class Action(Enum):
    """What a rule asks the rollout to do; declared in priority order."""

    ROLLBACK = "rollback"
    PAUSE = "pause"
    PROMOTE = "promote"
    CONTINUE = "continue"

    @property
    def priority(self) -> int:
        """Lower is stronger: rollback 0, pause 1, promote 2, continue 3."""
        return _PRIORITY[self]


_PRIORITY = {a: i for i, a in enumerate(Action)}


def _hashed(node: object, *fields: object) -> None:
    """Store the node's hash: children hash in O(1), so hashing a tree is O(1), not O(size)."""
    object.__setattr__(node, "_hash", hash((type(node).__name__, *fields)))


def _depth(*children: Expr) -> int:
    return 1 + max((c.depth for c in children), default=0)


@dataclass(frozen=True, slots=True)
class Number:
    """A literal: `300ms`, `1.5%`, `2Gi`, `3`.

    `value` is in base units (seconds, a 0..1 ratio, bytes); `unit` is the unit
    as written (`ms`, `%`, `Gi`), empty for a plain number.
    """

    value: float
    dim: Dim
    text: str
    unit: str = ""
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=1, compare=False, repr=False)
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        _hashed(self, self.value, self.dim, self.text, self.unit)


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=1, compare=False, repr=False)
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        _hashed(self, self.value)


@dataclass(frozen=True, slots=True)
class Ref:
    """A name: `p99`, `canary.p99`, `stable.error_rate`, `weight`.

    `track` is None when the author wrote a bare name; whether that means a
    context value or `canary.NAME` is decided by the checker.
    """

    name: str
    track: str | None = None
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=1, compare=False, repr=False)
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        _hashed(self, self.name, self.track)

    @property
    def text(self) -> str:
        return self.name if self.track is None else f"{self.track}.{self.name}"


@dataclass(frozen=True, slots=True)
class LastN:
    """The window argument `last N`: the last N evaluations."""

    count: Number
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=2, compare=False, repr=False)
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        _hashed(self, self.count)


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Expr | LastN, ...]
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    func_span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=0, compare=False, repr=False)
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", 1 + max((a.depth for a in self.args), default=0))
        _hashed(self, self.func, self.args)


@dataclass(frozen=True, slots=True)
class Unary:
    """`-x` (op `-`) or `not x` (op `not`)."""

    op: str
    operand: Expr
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=0, compare=False, repr=False)

    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(self.operand))
        _hashed(self, self.op, self.operand)


@dataclass(frozen=True, slots=True)
class Binary:
    """Arithmetic (`+ - * /`), comparison (`> >= < <= == !=`) or logic (`and or`)."""

    op: str
    left: Expr
    right: Expr
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    op_span: Span = field(default=NO_SPAN, compare=False, repr=False)
    depth: int = field(default=0, compare=False, repr=False)

    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", _depth(self.left, self.right))
        _hashed(self, self.op, self.left, self.right)


Expr = Number | Bool | Ref | Call | Unary | Binary

ARITHMETIC = frozenset({"+", "-", "*", "/"})
COMPARISON = frozenset({">", ">=", "<", "<=", "==", "!="})
LOGIC = frozenset({"and", "or"})


@dataclass(frozen=True, slots=True)
class Rule:
    """`[name:] condition [for duration] -> action`.

    `action` is the word as written; the checker turns it into an `Action`.
    """

    name: str | None
    condition: Expr
    action: str
    for_: Number | None = None
    line: int = field(default=0, compare=False)
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    name_span: Span = field(default=NO_SPAN, compare=False, repr=False)
    action_span: Span = field(default=NO_SPAN, compare=False, repr=False)

    @property
    def label(self) -> str:
        """How messages call the rule: its name, or `line N`."""
        return self.name if self.name is not None else f"line {self.line}"


@dataclass(frozen=True, slots=True)
class MetricDef:
    """`metric NAME = promql `TEMPLATE` as UNIT`."""

    name: str
    template: str
    unit: str
    line: int = field(default=0, compare=False)
    span: Span = field(default=NO_SPAN, compare=False, repr=False)
    name_span: Span = field(default=NO_SPAN, compare=False, repr=False)
    template_span: Span = field(default=NO_SPAN, compare=False, repr=False)
    unit_span: Span = field(default=NO_SPAN, compare=False, repr=False)


Statement = Rule | MetricDef


@dataclass(frozen=True, slots=True)
class Comment:
    """A `#` comment; kept so the formatter can put it back."""

    text: str
    line: int
    own_line: bool


@dataclass(frozen=True, slots=True)
class Policy:
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(s for s in self.statements if isinstance(s, Rule))

    @property
    def metrics(self) -> tuple[MetricDef, ...]:
        return tuple(s for s in self.statements if isinstance(s, MetricDef))


def children(node: Expr | LastN) -> tuple[Expr | LastN, ...]:
    """The direct sub-expressions of a node, left to right."""
    if isinstance(node, Call):
        return node.args
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, LastN):
        return (node.count,)
    return ()
