"""The policy store: a directory of `.rules` files in, compiled policies by name out.

    store = PolicyStore("/etc/codedance/policies", on_error=emit_event, telemetry=metrics)
    store.load()                       # a ReloadResult; never raises
    task = asyncio.ensure_future(store.watch(clock))
    policy = store.get("checkout")     # checkout.rules, compiled, or None

The directory is usually a mounted ConfigMap. Kubernetes updates one by
writing a new hidden directory (`..2026_11_27_13_00_00.123/`), pointing the
`..data` symlink at it with one atomic rename, and keeping every visible
`NAME.rules` a symlink to `..data/NAME.rules`. The store follows those links
and ignores hidden entries, so each policy is seen once, by its visible name.

A reload is all or nothing. Every `.rules` file is read and compiled; only
when all of them are good does the new set replace the old one, in a single
assignment, so a reader sees either the old set or the new one and never a
mix. One bad file keeps the whole last good set (a policy may be split into
files that are edited together) and is reported four ways: the returned
`ReloadResult` (diagnostics rendered in the fixed file:line:col format), a
log line on the "codedance.policies" logger, `Telemetry.policy_reload_failed`
and the `on_error` callback, which the controller turns into a Kubernetes
Event. A file that cannot be read (permissions, bytes that are not UTF-8, a
directory that is not there yet) is reported the same way; nothing is raised.

Change detection polls a fingerprint instead of depending on inotify, which
misses ConfigMap updates made through symlink swaps unless watched with care
and is not available everywhere: the `..data` target plus the name, inode,
size, times and mode of every policy file. Polling reads no file content, so
it is cheap at any interval; a reload happens only when the fingerprint moves.

Rollouts pin the compiled object they started with, so a reload never changes
a running rollout. `by_hash` finds every version a rollout may still hold.
"""

from __future__ import annotations

import logging
import os
import stat
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import dsl
from dsl.compile import CompiledPolicy
from engine.ports import Clock, NoTelemetry, Telemetry

log = logging.getLogger("codedance.policies")

SUFFIX = ".rules"
DATA_LINK = "..data"

# Re-reads when the directory changed while it was being read (a ConfigMap
# swap between two files would otherwise give a mix of old and new files).
_READ_ATTEMPTS = 3

Fingerprint = tuple[object, ...]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """Why one policy file, or the directory itself (`name` None), could not be used.

    `message` is the text for the user: the rendered diagnostics of a policy
    with errors, or a one-line reading error; each starts with the path.
    """

    name: str | None
    path: str
    message: str

    @property
    def summary(self) -> str:
        """The first line of the message, for one-line logs."""
        return self.message.split("\n", 1)[0]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload did: the version served afterwards, and what changed or failed.

    When `ok` is false nothing changed: the last good set is still served and
    `problems` says why, one entry per bad file.
    """

    ok: bool
    version: int
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    problems: tuple[PolicyProblem, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.updated)

    @property
    def message(self) -> str:
        """Every problem's text, as a user reads it; empty when the reload succeeded."""
        return "\n".join(p.message for p in self.problems)


ErrorCallback = Callable[[ReloadResult], None]


class PolicyStore:
    """Compiled policies from a directory of `.rules` files; a `PolicyProvider`.

    The policy name is the file name without `.rules`. `version` counts the
    sets served so far (0: nothing loaded yet) and `last_error` holds the text
    of the last reload if it failed, None after a successful one.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        on_error: ErrorCallback | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.on_error = on_error
        self.telemetry = telemetry or NoTelemetry()
        self._policies: Mapping[str, CompiledPolicy] = MappingProxyType({})
        # Weak: a version stays findable exactly as long as something (the
        # current set, a rollout that pinned it) still holds it, with no bound
        # to tune and no old version kept alive for nobody.
        self._by_hash: weakref.WeakValueDictionary[str, CompiledPolicy] = (
            weakref.WeakValueDictionary()
        )
        self._version = 0
        self._fingerprint: Fingerprint | None = None
        self.last_result: ReloadResult | None = None

    # --- reading the set ----------------------------------------------------------

    def get(self, name: str) -> CompiledPolicy | None:
        return self._policies.get(name)

    def names(self) -> list[str]:
        return sorted(self._policies)

    @property
    def policies(self) -> Mapping[str, CompiledPolicy]:
        """The whole current set, read-only; it never changes under the caller."""
        return self._policies

    def by_hash(self, source_hash: str) -> CompiledPolicy | None:
        """A version seen since start that is served or still held by someone.

        Two files with the same text share a hash and behave the same; this
        returns one of them.
        """
        return self._by_hash.get(source_hash)

    @property
    def version(self) -> int:
        return self._version

    @property
    def last_error(self) -> str | None:
        result = self.last_result
        return None if result is None or result.ok else result.message

    # --- loading --------------------------------------------------------------------

    def load(self) -> ReloadResult:
        """The first reload; the same as `reload()`."""
        return self.reload()

    def reload(self) -> ReloadResult:
        """Read and compile every file; swap the set in if all are good. Never raises."""
        try:
            result = self._reload()
        except Exception as e:  # a bug here must not stop the controller serving policies
            log.exception("reloading the policies in %s failed unexpectedly", self.directory)
            message = f"{self.directory}: reload failed: {e!r}"
            result = self._failed([PolicyProblem(None, self.directory, message)])
        self.last_result = result
        return result

    async def watch(self, clock: Clock, interval: float = 2.0) -> None:
        """Reload whenever the directory's fingerprint changes; runs until cancelled.

        Loads first if nothing was loaded yet. Errors are reported, never raised.
        The reload runs on the loop itself: a ConfigMap holds at most 1 MiB and
        compiling it takes milliseconds, less than a thread hand-off is worth.
        """
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        if self._fingerprint is None:
            self.reload()
        while True:
            await clock.sleep_until(clock.now() + interval)
            try:
                if fingerprint(self.directory) != self._fingerprint:
                    self.reload()
            except Exception:  # keep watching: the next change may well be the fix
                log.exception("watching the policies in %s failed", self.directory)

    def _reload(self) -> ReloadResult:
        after = fingerprint(self.directory)
        for _ in range(_READ_ATTEMPTS):
            before = after
            sources, problems = read_policy_files(self.directory)
            after = fingerprint(self.directory)
            if after == before:
                break
        # Keep the fingerprint from before the last read: if the files still
        # moved during it, the next poll sees a difference and reads again.
        self._fingerprint = before

        compiled: dict[str, CompiledPolicy] = {}
        for name, (path, text) in sorted(sources.items()):
            try:
                compiled[name] = self._compile(text, path)
            except dsl.PolicyError as e:
                problems.append(PolicyProblem(name, path, e.render()))
            except Exception as e:  # a checker or compiler bug is this file's problem
                log.exception("compiling %s failed unexpectedly", path)
                problems.append(PolicyProblem(name, path, f"{path}: cannot compile: {e!r}"))
        if problems:
            return self._failed(problems)
        return self._swap(compiled)

    def _compile(self, text: str, path: str) -> CompiledPolicy:
        """The compiled policy, reusing a version already held for the same file and text.

        Reuse keeps `get` returning the very object rollouts pinned while a
        file is unchanged (or put back as it was), and skips a recompile.
        """
        for known in self._by_hash.values():
            if known.path == path and known.source == text:
                return known
        return dsl.load(text, path)

    def _swap(self, new: dict[str, CompiledPolicy]) -> ReloadResult:
        old = self._policies
        added = tuple(n for n in new if n not in old)
        removed = tuple(n for n in sorted(old) if n not in new)
        updated = tuple(n for n in new if n in old and new[n] is not old[n])
        if added or removed or updated:
            for policy in new.values():
                self._by_hash[policy.source_hash] = policy
            self._version += 1
            self._policies = MappingProxyType(new)  # one assignment: readers see old or new
            log.info(
                "policies in %s reloaded as version %d (added: %s; updated: %s; removed: %s)",
                self.directory,
                self._version,
                _names(added),
                _names(updated),
                _names(removed),
            )
        return ReloadResult(True, self._version, added, removed, updated)

    def _failed(self, problems: list[PolicyProblem]) -> ReloadResult:
        result = ReloadResult(False, self._version, problems=tuple(problems))
        log.error(
            "policies in %s not reloaded, still serving version %d: %s",
            self.directory,
            self._version,
            "; ".join(p.summary for p in problems),
        )
        for p in problems:
            _report(self.telemetry.policy_reload_failed, p.name or self.directory)
        if self.on_error is not None:
            _report(self.on_error, result)
        return result


def _report(callback: Callable[[_T], None], value: _T) -> None:
    """Call a reporting hook; a failing hook is logged, never allowed to stop a reload."""
    try:
        callback(value)
    except Exception:
        log.exception("reporting a policy reload failure failed")


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) or "-"


def is_policy_file_name(name: str) -> bool:
    """A visible `NAME.rules` entry; hidden ones are the ConfigMap's own bookkeeping."""
    return name.endswith(SUFFIX) and not name.startswith(".")


def fingerprint(directory: str) -> Fingerprint:
    """A cheap value that changes whenever a policy file or the `..data` link changes.

    Stats follow symlinks, so a file reached through a swapped link shows
    its new inode even when size and mtime are the same as before. A link
    whose target is gone is left out, as `read_policy_files` leaves it out.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return ("unreadable", e.errno)
    try:
        data: str | None = os.readlink(os.path.join(directory, DATA_LINK))
    except OSError:
        data = None
    entries: list[object] = [data]
    for name in names:
        if not is_policy_file_name(name):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        except OSError as e:
            entries.append((name, "error", e.errno))
            continue
        entries.append(
            (name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        )
    return tuple(entries)


def read_policy_files(
    directory: str,
) -> tuple[dict[str, tuple[str, str]], list[PolicyProblem]]:
    """The text of every policy file by name, as (path, text), and what could not be read.

    Text is read as `codedance check` reads it (UTF-8, universal newlines), so
    the source hash a rollout records is the one the command line shows.
    A symlink whose target is gone counts as no file: that is how a file
    removed from a ConfigMap looks until its visible link is removed too.
    """
    sources: dict[str, tuple[str, str]] = {}
    problems: list[PolicyProblem] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        problems.append(PolicyProblem(None, directory, f"{directory}: no such directory"))
        return sources, problems
    except OSError as e:
        message = f"{directory}: cannot list the policy directory: {e.strerror or e}"
        problems.append(PolicyProblem(None, directory, message))
        return sources, problems
    for entry in names:
        if not is_policy_file_name(entry):
            continue
        name = entry[: -len(SUFFIX)]
        path = os.path.join(directory, entry)
        try:
            # Opening a FIFO or a device would block or never end; only files are policies.
            if not stat.S_ISREG(os.stat(path).st_mode):
                problems.append(PolicyProblem(name, path, f"{path}: not a regular file"))
                continue
            with open(path, encoding="utf-8") as f:
                sources[name] = (path, f.read())
        except FileNotFoundError:
            continue
        except UnicodeDecodeError as e:
            message = (
                f"{path}: cannot read: not UTF-8 text (byte {e.object[e.start]:#04x} "
                f"at offset {e.start})"
            )
            problems.append(PolicyProblem(name, path, message))
        except OSError as e:
            problems.append(PolicyProblem(name, path, f"{path}: cannot read: {e.strerror or e}"))
    return sources, problems
