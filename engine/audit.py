"""The audit log: every transition, with who did it and why, as JSON lines.

In: `AuditEntry` values from the loop. Out: one JSON object per line
(`time`, `rollout`, `actor`, `from`, `to`, `action`, `rule`, `explanation`,
`weight`) appended to a file, flushed per entry so a crash loses nothing
already decided. `LoggingAudit` writes the same lines to the log (a
controller's default); `MemoryAudit` keeps entries in a list for tools and tests.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from engine.model import AuditEntry


class JsonLinesAudit:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    async def record(self, entry: AuditEntry) -> None:
        line = entry.model_dump_json(by_alias=True) + "\n"
        async with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)


class LoggingAudit:
    """Each entry as one JSON line on the `codedance.audit` logger (the pod's log)."""

    def __init__(self) -> None:
        self._log = logging.getLogger("codedance.audit")

    async def record(self, entry: AuditEntry) -> None:
        self._log.info("%s", entry.model_dump_json(by_alias=True))


class MemoryAudit:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def record(self, entry: AuditEntry) -> None:
        self.entries.append(entry)
