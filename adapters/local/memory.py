"""In-process implementations of the engine's ports, for local runs, tools and benchmarks.

`MemoryRouter` keeps weights in a dict and counts every write (the tests use
the count to prove a step is never applied twice); `NoopWorkloads` has
nothing to bring up; `MemoryStore` keeps statuses in a dict; `FileStore`
keeps each status as a JSON file, written atomically, so a local run
survives a restart the way a controller does with the CRD's status.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.model import RolloutStatus
from engine.ports import RolloutRef


class MemoryRouter:
    def __init__(self) -> None:
        self.weights: dict[str, int] = {}
        self.writes: list[tuple[str, int]] = []

    @staticmethod
    def _key(rollout: RolloutRef) -> str:
        return f"{rollout.namespace}/{rollout.name}"

    async def set_weight(self, rollout: RolloutRef, weight: int) -> None:
        if not 0 <= weight <= 100:
            raise ValueError(f"weight {weight} is outside 0..100")
        key = self._key(rollout)
        self.writes.append((key, weight))
        self.weights[key] = weight

    async def get_weight(self, rollout: RolloutRef) -> int:
        return self.weights.get(self._key(rollout), 0)


class NoopWorkloads:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def bring_up(self, rollout: RolloutRef) -> None:
        self.calls.append(("bring_up", rollout.name))

    async def promote(self, rollout: RolloutRef) -> None:
        self.calls.append(("promote", rollout.name))

    async def retire(self, rollout: RolloutRef) -> None:
        self.calls.append(("retire", rollout.name))


class MemoryStore:
    def __init__(self) -> None:
        self.statuses: dict[str, RolloutStatus] = {}

    async def load(self, key: str) -> RolloutStatus | None:
        return self.statuses.get(key)

    async def save(self, key: str, status: RolloutStatus) -> None:
        self.statuses[key] = status


class FileStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / (key.replace("/", "__") + ".json")

    async def load(self, key: str) -> RolloutStatus | None:
        path = self._path(key)
        if not path.exists():
            return None
        return RolloutStatus.model_validate_json(path.read_text(encoding="utf-8"))

    async def save(self, key: str, status: RolloutStatus) -> None:
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".status-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(status.model_dump_json())
        os.replace(tmp, path)
