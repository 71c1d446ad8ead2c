"""The provider registry: a group and a name in, a checked provider out.

Traffic routers, metric sources, strategies and deciders are found through
Python entry points, so a new provider is an installed package, not a fork.
A package declares one in its `pyproject.toml`::

    [project.entry-points."codedance.traffic"]
    my-mesh = "my_package.router:MyMeshRouter"

and `create(TRAFFIC, "my-mesh", ...)` builds it. Codedance registers its own
providers the same way, so ours and a third party's are found alike.

An entry point names a provider (an object that satisfies the group's
Protocol), a class, or a factory (any callable). A class is checked when it
is loaded (the Protocol's methods present, `async` where the Protocol's are);
what a factory returns is checked when `create` calls it. Every failure is a
`ProviderError` with a one-line message naming the provider and what to do:
an unknown name (with the closest known one and the list of known names), a
package whose import fails (the entry point and the error), an object that
does not satisfy the Protocol (the members it lacks), or arguments the
factory does not take.

Entry points are read once and loaded providers are cached; `refresh()`
forgets both, for a process that installs a package while it runs.
The Protocols are resolved by name when first needed, so the modules that
define them (the strategy module among them) can use the registry.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from dsl.units import closest

if TYPE_CHECKING:
    from engine.decider import Decider
    from engine.ports import MetricSource, TrafficRouter
    from engine.strategy import Strategy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Group(Generic[T]):
    """An entry point group, and what each of its providers must be."""

    name: str
    kind: str  # what one provider is called in a message
    protocol: str  # "module:attribute" of the Protocol (or class) a provider satisfies

    def resolve(self) -> type:
        module, _, attribute = self.protocol.partition(":")
        return cast(type, getattr(importlib.import_module(module), attribute))


TRAFFIC: Group[TrafficRouter] = Group(
    "codedance.traffic", "traffic router", "engine.ports:TrafficRouter"
)
METRICS: Group[MetricSource] = Group(
    "codedance.metrics", "metric source", "engine.ports:MetricSource"
)
STRATEGIES: Group[Strategy] = Group("codedance.strategies", "strategy", "engine.strategy:Strategy")
DECIDERS: Group[Decider] = Group("codedance.deciders", "decider", "engine.decider:Decider")

GROUPS: dict[str, Group[Any]] = {g.name: g for g in (TRAFFIC, METRICS, STRATEGIES, DECIDERS)}


class ProviderError(Exception):
    """A provider that cannot be used; the message (one line) names it and says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownProvider(ProviderError, LookupError):
    """No installed package registers the name."""


class BrokenProvider(ProviderError):
    """The provider's entry point is there, but its import fails."""


class InvalidProvider(ProviderError, TypeError):
    """The provider does not satisfy its group's Protocol, or cannot be built as asked."""


def available(group: Group[Any] | str) -> list[str]:
    """The names registered in `group`, sorted."""
    return sorted(_entry_points(_group(group).name))


def check_name(group: Group[Any] | str, name: str) -> None:
    """Raise `UnknownProvider` unless some installed package registers `name` in `group`."""
    g = _group(group)
    if name not in _entry_points(g.name):
        raise UnknownProvider(_unknown(g, name))


def load(group: Group[Any] | str, name: str) -> object:
    """The provider, class or factory registered as `name`, checked as far as it can be."""
    g = _group(group)
    return _load(g.name, name)


def create(group: Group[T], name: str, /, *args: Any, **kwargs: Any) -> T:
    """The provider registered as `name`, built with `args` when it is a class or factory.

    A provider registered as a ready object is returned as it is, without
    arguments. A factory's own errors (a bad setting, say) reach the caller
    unchanged; arguments it does not take are an `InvalidProvider`.
    """
    obj = load(group, name)
    protocol = group.resolve()
    if _satisfies(obj, protocol):
        return cast(T, obj)
    where = _describe(group, name)
    factory = cast(Callable[..., object], obj)
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
        raise InvalidProvider(f"{where} cannot be built here: {e}") from None
    except ValueError:
        pass  # no signature to read (some builtins): let the call decide
    product = factory(*args, **kwargs)
    if not _satisfies(product, protocol):
        raise InvalidProvider(
            f"{where} made {_a(product)}, which is not {_a_kind(protocol)}"
            f"{_lacking(product, protocol)}"
        )
    return cast(T, product)


def refresh() -> None:
    """Forget what was read and loaded: packages installed since are then found."""
    importlib.invalidate_caches()
    _entry_points.cache_clear()
    _load.cache_clear()


# --- reading entry points -----------------------------------------------------------


def _group(group: Group[Any] | str) -> Group[Any]:
    if isinstance(group, Group):
        return group
    try:
        return GROUPS[group]
    except KeyError:
        raise UnknownProvider(
            f"unknown provider group {group!r}; known: {', '.join(sorted(GROUPS))}"
        ) from None


@functools.cache
def _entry_points(group: str) -> dict[str, tuple[metadata.EntryPoint, ...]]:
    found: dict[str, tuple[metadata.EntryPoint, ...]] = {}
    for ep in metadata.entry_points(group=group):
        found[ep.name] = (*found.get(ep.name, ()), ep)
    return found


@functools.cache
def _load(group: str, name: str) -> object:
    g = GROUPS[group]
    eps = _entry_points(group).get(name)
    if not eps:
        raise UnknownProvider(_unknown(g, name))
    if len(eps) > 1:
        by = " and ".join(f"{_dist(ep)} ({ep.value})" for ep in eps)
        raise InvalidProvider(
            f"{g.kind} {name!r} is registered by two packages, {by}; uninstall one of them"
        )
    ep = eps[0]
    where = _describe(g, name)
    try:
        obj = ep.load()
    except Exception as e:
        raise BrokenProvider(f"{where} failed to load: {_one_line(e)}") from None
    _check(obj, g.resolve(), where)
    return obj


def _dist(ep: metadata.EntryPoint) -> str:
    dist = ep.dist
    return dist.name if dist is not None else "an unnamed package"


def _describe(group: Group[Any], name: str) -> str:
    eps = _entry_points(group.name).get(name, ())
    value = eps[0].value if len(eps) == 1 else "?"
    return f"{group.kind} {name!r} (entry point {name} = {value} in {group.name})"


def _unknown(group: Group[Any], name: str) -> str:
    known = sorted(_entry_points(group.name))
    if not known:
        return (
            f"unknown {group.kind} {name!r}: no package registers one (entry point group "
            f"{group.name}); is codedance installed (pip install -e .)?"
        )
    starting = [k for k in known if k.startswith(name)] if name else []
    # a unique name it begins (`expo`) is the likelier slip than a near spelling
    guess = starting[0] if len(starting) == 1 else closest(name, known)
    hint = f" (did you mean {guess!r}?)" if guess is not None else ""
    return (
        f"unknown {group.kind} {name!r}{hint}; known: {', '.join(known)} "
        f"(a package adds one in the entry point group {group.name})"
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- checking providers -------------------------------------------------------------


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


@dataclass(frozen=True, slots=True)
class _Member:
    method: bool
    is_async: bool


def _members(protocol: type) -> dict[str, _Member]:
    """The Protocol's public members: methods (and whether `async`) and attributes."""
    members: dict[str, _Member] = {}
    for base in reversed(protocol.__mro__):
        if base is object or base is Protocol or not _is_protocol(base):
            continue
        for name in getattr(base, "__annotations__", {}):
            if not name.startswith("_"):
                members[name] = _Member(method=False, is_async=False)
        for name, value in vars(base).items():
            if not name.startswith("_") and callable(value):
                members[name] = _Member(method=True, is_async=inspect.iscoroutinefunction(value))
    return members


def _lacking(obj: object, protocol: type) -> str:
    """What `obj` lacks to satisfy `protocol`, as the end of a message ("" when nothing)."""
    if not _is_protocol(protocol):
        return ""
    missing: list[str] = []
    not_async: list[str] = []
    for name, member in _members(protocol).items():
        if isinstance(obj, type) and not member.method:
            continue  # an attribute a class sets in __init__: seen on what it makes
        if not hasattr(obj, name):
            missing.append(name)
        elif member.is_async and not _is_async(getattr(obj, name)):
            not_async.append(name)
    parts = []
    if missing:
        parts.append("it has no " + ", ".join(missing))
    if not_async:
        parts.append(", ".join(not_async) + " must be `async def`")
    return ": " + "; ".join(parts) if parts else ""


def _is_async(member: object) -> bool:
    if not inspect.isfunction(member) and not inspect.ismethod(member):
        return True  # a callable object or a property: nothing to tell from outside
    return inspect.iscoroutinefunction(member) or inspect.iscoroutinefunction(
        inspect.unwrap(member)
    )


def _satisfies(obj: object, protocol: type) -> bool:
    if isinstance(obj, type):
        return False  # a class is a factory of providers, not one itself
    return isinstance(obj, protocol) and not _lacking(obj, protocol)


def _check(obj: object, protocol: type, where: str) -> None:
    if isinstance(obj, type):
        lacking = _lacking(obj, protocol)
        if lacking:
            raise InvalidProvider(f"{where} is not {_a_kind(protocol)}{lacking}")
        return
    if _satisfies(obj, protocol) or callable(obj):
        return
    raise InvalidProvider(
        f"{where} is {_a(obj)}: neither {_a_kind(protocol)} nor a class or factory that "
        f"makes one{_lacking(obj, protocol)}"
    )


def _a(obj: object) -> str:
    return "None" if obj is None else _article(type(obj).__qualname__)


def _a_kind(protocol: type) -> str:
    return _article(protocol.__qualname__)


def _article(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"
