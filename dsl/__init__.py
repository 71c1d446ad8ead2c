"""The Codedance policy language: parse, check, compile, evaluate, format.

    from dsl import load
    policy = load(text, "checkout.rules")      # raises PolicyError with diagnostics
    state = policy.new_state()
    verdict = policy.evaluate(now, {"canary.p99": 0.41, "weight": 25.0}, state)
    print(verdict.explanation)  # rollback: latency: canary.p99 = 410ms > 300ms, true for 2m

Stages, one module each: `parser` (text -> `ast.Policy`), `check` (names,
types, units -> `CheckedPolicy`), `compile` (-> `CompiledPolicy`, a fast pure
evaluator), `runtime` (verdicts and state), `format` (canonical text),
`promql` (metric query templates), `series` (promtool's series notation).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from dsl.diagnostics import Diagnostic, PolicyError, render

if TYPE_CHECKING:
    from dsl.compile import CompiledPolicy

__all__ = ["Diagnostic", "PolicyError", "check_source", "load", "render"]


def check_source(source: str) -> list[Diagnostic]:
    """Every diagnostic of a policy text: syntax first, then names, types and units."""
    from dsl.check import check
    from dsl.parser import parse

    tree, diagnostics = parse(source)
    if tree is None:
        return diagnostics
    return check(tree)[1]


def load(source: str, path: str = "<policy>") -> CompiledPolicy:
    """Parse, check and compile a policy; raise `PolicyError` if it has errors."""
    from dsl.check import check
    from dsl.compile import compile_policy
    from dsl.parser import parse

    tree, diagnostics = parse(source)
    if tree is None:
        raise PolicyError(diagnostics, source, path)
    checked, diagnostics = check(tree)
    if checked is None or any(d.severity == "error" for d in diagnostics):
        raise PolicyError(diagnostics, source, path)
    digest = hashlib.sha256(source.encode()).hexdigest()
    return compile_policy(checked, source_hash=digest, path=path, source=source)
