"""The audit log: every transition, with who did it and why, as JSON lines.

In: `AuditEntry` values from the loop. Out: one JSON object per line
(`time`, `rollout`, `actor`, `from`, `to`, `action`, `rule`, `explanation`,
`weight`) appended to a file, flushed per entry so a crash loses nothing
already decided. `MemoryAudit` keeps entries in a list for tools and tests.
"""

from __future__ import annotations

import asyncio
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


class MemoryAudit:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def record(self, entry: AuditEntry) -> None:
        self.entries.append(entry)
