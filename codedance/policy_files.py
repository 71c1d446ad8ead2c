"""Policy and test files on disk: paths in, file lists, text and YAML data out.

Shared by `codedance check`, `fmt` and `test`. Every failure becomes a
one-line message a person can act on (`UsageError` for a path that cannot be
what the command wants, `FileProblem` for a file that cannot be read or
parsed), never a traceback.

Paths are shown as the user gave them: a file named on the command line keeps
its spelling, and a file found in a directory is that spelling joined with its
place below it (`rules/` finds `rules/checkout.rules`), so diagnostics point at
paths the user can paste.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

import dsl
from dsl.compile import CompiledPolicy


class UsageError(Exception):
    """A command line naming something the command cannot work on."""


class FileProblem(Exception):
    """A file that cannot be read or parsed; the message names it."""


def find_files(
    paths: Sequence[str], pattern: str, accepts: Callable[[str], bool], kind: str
) -> list[str]:
    """Files named by `paths`: files as given, directories searched for `pattern`.

    `accepts` says whether a file named directly is of the right kind; `kind`
    names that kind in messages ("`.rules` file"). Raises `UsageError` for a
    path that does not exist, is of the wrong kind, or is a directory holding
    no matching file.
    """
    if not paths:
        raise UsageError(f"name at least one {kind} or directory")
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            matches = _walk(path, pattern)
            if not matches:
                raise UsageError(f"{path}: no {pattern} files in this directory")
            found.extend(matches)
        elif os.path.isfile(path):
            if not accepts(path):
                raise UsageError(f"{path}: not a {kind} or a directory")
            found.append(path)
        elif os.path.lexists(path):
            raise UsageError(f"{path}: not a {kind} or a directory")
        else:
            raise UsageError(f"{path}: no such file or directory")
    # The same file named twice (`a.rules rules/`) is checked once.
    seen: set[str] = set()
    unique = []
    for f in found:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _walk(root: str, pattern: str) -> list[str]:
    """Matching files below `root`, sorted, skipping hidden directories.

    Hidden directories are skipped because a mounted ConfigMap keeps each file
    twice (`name` and `..data/name`); `.git` and `.venv` have nothing for us.
    """
    matches = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if fnmatch.fnmatchcase(name, pattern) and not name.startswith("."):
                full = os.path.join(directory, name)
                if os.path.isfile(full):
                    matches.append(full)
    return sorted(matches, key=lambda p: os.path.relpath(p, root).split(os.sep))


def read_text(path: str, keep_newlines: bool = False) -> str:
    """The UTF-8 text of a file; `keep_newlines` leaves `\\r\\n` as written."""
    try:
        with open(path, encoding="utf-8", newline="" if keep_newlines else None) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise FileProblem(
            f"{path}: cannot read: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start})"
        ) from None
    except OSError as e:
        raise FileProblem(f"{path}: cannot read: {e.strerror or e}") from None


def load_policy(path: str, source: str | None = None) -> CompiledPolicy:
    """A compiled policy from a file (or its given text); diagnostics go to stderr and a
    bad file is a `UsageError`, so a command stops with one line and exit 2."""
    if source is None:
        try:
            source = read_text(path)
        except FileProblem as e:
            raise UsageError(str(e)) from None
    try:
        return dsl.load(source, path)
    except dsl.PolicyError as e:
        print(e.render(), file=sys.stderr)
        raise UsageError(f"{path} has errors") from None


def write_atomically(path: str, text: str) -> None:
    """Replace a file's content so that a reader sees the old or the new text, never half.

    The new text goes to a temporary file in the same directory (a rename is
    atomic only within one file system) and is renamed over the target; a
    symbolic link is followed, so the file it points at is replaced, not the link.
    """
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        mode = os.stat(target).st_mode & 0o7777
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise FileProblem(f"{path}: cannot write: {e.strerror or e}") from None


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping.

    YAML keeps the last of two equal keys without a word; in a test file that
    silently drops an expectation or a series.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"the key `{key}` is written twice", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class YamlDocument:
    """Parsed YAML data with the positions of its nodes, to point at a value by its keys."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        loader = _Loader(text)
        try:
            self.node: Node | None = loader.get_single_node()
            self.data: Any = None if self.node is None else loader.construct_document(self.node)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            problem = e.problem or e.context or "invalid YAML"
            raise FileProblem(f"{where}: invalid YAML: {problem}") from None
        except yaml.YAMLError as e:
            raise FileProblem(f"{path}: invalid YAML: {e}") from None
        finally:
            loader.dispose()

    def position(self, loc: Sequence[str | int]) -> tuple[int, int] | None:
        """1-based (line, column) of the value at `loc`, or of the nearest enclosing one."""
        node = self.node
        if node is None:
            return None
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            node = child
        return node.start_mark.line + 1, node.start_mark.column + 1


def _child(node: Node, part: str | int) -> Node | None:
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == part:
                return value_node  # type: ignore[no-any-return]
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]  # type: ignore[no-any-return]
    return None


def load_yaml(path: str) -> YamlDocument:
    """Read and parse a YAML file; `FileProblem` with file:line:col when it is not YAML."""
    return YamlDocument(path, read_text(path))
