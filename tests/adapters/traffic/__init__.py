"""Tests of the Kubernetes traffic routers, and the golden-file check they share.

`assert_golden(provider, step, obj)` compares an object, without the
metadata the API server sets, with `tests/adapters/golden/<provider>/<step>.yaml`
(one YAML object per file, keys in the object's own order). `InstantClock` is
the engine's clock for a read-back retry that should not wait.
`CODEDANCE_UPDATE_GOLDEN=1 pytest tests/adapters/traffic` writes the files
instead; review the diff before keeping it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SERVER_SET = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields")


def without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` without the metadata the API server sets."""
    out = copy.deepcopy(obj)
    meta = out.get("metadata") or {}
    for key in SERVER_SET:
        meta.pop(key, None)
    return out


def assert_golden(provider: str, step: str, obj: dict[str, Any]) -> None:
    path = GOLDEN / provider / f"{step}.yaml"
    text = yaml.safe_dump(without_server_fields(obj), sort_keys=False)
    if os.environ.get("CODEDANCE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; run with CODEDANCE_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(encoding="utf-8"), f"{obj.get('kind')} differs from {path}"


class InstantClock:
    """The engine's clock for a retry that should not wait."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
