"""engine.policystore: a watched directory of `.rules` files, hot reload, last good set.

The fixture builds the layout kubelet writes for a ConfigMap volume: every
version in a hidden `..TIMESTAMP/` directory, `..data` pointing at the
current one, and each visible `NAME.rules` a symlink to `..data/NAME.rules`.
An update is a new directory and an atomic `os.replace` of the `..data` link.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from dsl.compile import CompiledPolicy
from engine.loop import LoopClock
from engine.policystore import PolicyStore, ReloadResult, fingerprint

LATENCY = "latency: p99 > 300ms for 2m -> rollback\n"
LATENCY_400 = "latency: p99 > 400ms for 2m -> rollback\n"  # same length as LATENCY
ERRORS = "errors: error_rate > 1% for 1m -> rollback\n"
ERRORS_2 = "errors: error_rate > 2% for 1m -> rollback\n"
# E201 at line 2, column 16: a percentage compared with a duration.
BAD = "# checkout\nlatency: p99 > 5% for 2m -> rollback\n"


class ConfigMapVolume:
    """A directory laid out and updated the way kubelet updates a ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0

    def publish(self, files: Mapping[str, str | bytes], *, mtime_ns: int | None = None) -> None:
        self.versions += 1
        version = self.root / f"..2026_11_27_13_00_{self.versions:02d}.{self.versions:03d}"
        version.mkdir()
        for name, content in files.items():
            path = version / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            if mtime_ns is not None:
                os.utime(path, ns=(mtime_ns, mtime_ns))
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(version.name, tmp)
        os.replace(tmp, data)  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for entry in self.root.iterdir():
            if not entry.name.startswith(".") and entry.name not in files:
                entry.unlink()
        if old is not None:
            shutil.rmtree(self.root / old)


class Recorder:
    """Telemetry and `on_error` in one: remembers what was reported."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.results: list[ReloadResult] = []

    def tick_lag(self, seconds: float) -> None:
        pass

    def verdict(self, action: str, rule: str | None) -> None:
        pass

    def phases(self, counts: Mapping[str, int]) -> None:
        pass

    def query(self, seconds: float, ok: bool) -> None:
        pass

    def policy_reload_failed(self, name: str) -> None:
        self.failed.append(name)

    def on_error(self, result: ReloadResult) -> None:
        self.results.append(result)


@pytest.fixture
def volume(tmp_path: Path) -> ConfigMapVolume:
    root = tmp_path / "policies"
    root.mkdir()
    return ConfigMapVolume(root)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def store_of(volume: ConfigMapVolume, recorder: Recorder) -> PolicyStore:
    return PolicyStore(volume.root, on_error=recorder.on_error, telemetry=recorder)


def policy(store: PolicyStore, name: str) -> CompiledPolicy:
    got = store.get(name)
    assert got is not None, f"no policy {name}"
    return got


# --- loading ----------------------------------------------------------------------


def test_load_serves_every_visible_rules_file_by_name(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS, "README.md": "hi"})
    store = store_of(volume, recorder)

    result = store.load()

    assert result.ok and result.added == ("checkout", "payments")
    assert store.names() == ["checkout", "payments"]  # no `..data`, no README
    checkout = policy(store, "checkout")
    assert checkout.path == str(volume.root / "checkout.rules")
    assert [r.label for r in checkout.rules] == ["latency"]
    assert store.version == 1 and store.last_error is None
    assert store.by_hash(checkout.source_hash) is checkout
    assert recorder.results == [] and recorder.failed == []


def test_a_valid_update_replaces_the_policy(volume: ConfigMapVolume, recorder: Recorder) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()
    before = policy(store, "checkout")

    volume.publish({"checkout.rules": LATENCY_400})
    result = store.reload()

    after = policy(store, "checkout")
    assert result.ok and result.updated == ("checkout",) and store.version == 2
    assert after.source_hash != before.source_hash
    assert after.source == LATENCY_400


def test_an_unchanged_file_keeps_its_compiled_object(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})
    store = store_of(volume, recorder)
    store.load()
    payments = policy(store, "payments")

    volume.publish({"checkout.rules": LATENCY_400, "payments.rules": ERRORS})
    result = store.reload()

    assert result.updated == ("checkout",)
    assert policy(store, "payments") is payments


def test_reloading_an_unchanged_directory_changes_nothing(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()

    result = store.reload()

    assert result.ok and not result.changed and store.version == 1


# --- errors keep the last good set ------------------------------------------------


def test_a_bad_file_keeps_the_last_good_policy_and_is_reported(
    volume: ConfigMapVolume, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()
    good = policy(store, "checkout")

    volume.publish({"checkout.rules": BAD})
    with caplog.at_level(logging.ERROR, logger="codedance.policies"):
        result = store.reload()

    path = volume.root / "checkout.rules"
    assert not result.ok and result.version == 1
    assert store.get("checkout") is good and store.version == 1
    assert result.message.startswith(f"{path}:2:16: error[E201]: ")
    assert "   2 | latency: p99 > 5% for 2m -> rollback" in result.message
    assert store.last_error == result.message
    assert recorder.failed == ["checkout"] and recorder.results == [result]
    logged = [r for r in caplog.records if r.name == "codedance.policies"]
    assert len(logged) == 1 and f"{path}:2:16: error[E201]" in logged[0].getMessage()


def test_a_fix_after_a_bad_file_is_picked_up(volume: ConfigMapVolume, recorder: Recorder) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()
    volume.publish({"checkout.rules": BAD})
    store.reload()

    volume.publish({"checkout.rules": LATENCY_400})
    result = store.reload()

    assert result.ok and store.last_error is None
    assert policy(store, "checkout").source == LATENCY_400 and store.version == 2


def test_one_bad_file_stops_every_change(volume: ConfigMapVolume, recorder: Recorder) -> None:
    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})
    store = store_of(volume, recorder)
    store.load()
    served = dict(store.policies)

    volume.publish({"checkout.rules": BAD, "payments.rules": ERRORS_2, "new.rules": LATENCY})
    result = store.reload()

    assert not result.ok
    assert dict(store.policies) == served  # payments not updated, new not added
    assert [p.name for p in result.problems] == ["checkout"]


def test_every_bad_file_is_reported(volume: ConfigMapVolume, recorder: Recorder) -> None:
    volume.publish({"a.rules": BAD, "b.rules": "p99 > 1s -> explode\n", "c.rules": LATENCY})
    store = store_of(volume, recorder)

    result = store.load()

    assert [p.name for p in result.problems] == ["a", "b"]
    assert f"{volume.root / 'b.rules'}:1:" in result.message
    assert recorder.failed == ["a", "b"]


def test_a_first_load_with_errors_leaves_the_store_empty(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": BAD, "payments.rules": ERRORS})
    store = store_of(volume, recorder)

    result = store.load()

    assert not result.ok and store.names() == [] and store.version == 0
    assert store.get("payments") is None
    assert recorder.results == [result]


def test_a_failing_report_hook_does_not_break_the_reload(volume: ConfigMapVolume) -> None:
    def explode(result: ReloadResult) -> None:
        raise RuntimeError("event API down")

    volume.publish({"checkout.rules": BAD})
    store = PolicyStore(volume.root, on_error=explode)

    result = store.load()

    assert not result.ok and store.last_error == result.message


# --- reading errors ---------------------------------------------------------------


def test_a_missing_directory_is_reported_not_raised(tmp_path: Path, recorder: Recorder) -> None:
    missing = tmp_path / "not-yet"
    store = PolicyStore(missing, on_error=recorder.on_error, telemetry=recorder)

    result = store.load()

    assert not result.ok and result.message == f"{missing}: no such directory"
    assert recorder.failed == [str(missing)]


def test_invalid_utf8_is_reported_with_its_path(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()
    good = policy(store, "checkout")

    volume.publish({"checkout.rules": b"latency: p99 > 300\xffms -> rollback\n"})
    result = store.reload()

    path = volume.root / "checkout.rules"
    assert result.message == f"{path}: cannot read: not UTF-8 text (byte 0xff at offset 18)"
    assert store.get("checkout") is good


def test_unreadable_entries_are_reported(volume: ConfigMapVolume, recorder: Recorder) -> None:
    volume.publish({"checkout.rules": LATENCY})
    os.symlink("loop.rules", volume.root / "loop.rules")  # stat fails even for root
    os.mkfifo(volume.root / "pipe.rules")  # opening it would block forever
    store = store_of(volume, recorder)

    result = store.load()

    messages = {p.name: p.message for p in result.problems}
    assert messages["loop"].startswith(f"{volume.root / 'loop.rules'}: cannot read: ")
    assert messages["pipe"] == f"{volume.root / 'pipe.rules'}: not a regular file"
    assert store.names() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_reported(tmp_path: Path, recorder: Recorder) -> None:
    (tmp_path / "checkout.rules").write_text(LATENCY)
    (tmp_path / "checkout.rules").chmod(0)
    store = PolicyStore(tmp_path, on_error=recorder.on_error, telemetry=recorder)

    result = store.load()

    assert result.message == f"{tmp_path / 'checkout.rules'}: cannot read: Permission denied"


def test_a_dangling_link_counts_as_a_removed_file(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})
    store = store_of(volume, recorder)
    store.load()
    # Between kubelet's swap of `..data` and its removal of the visible link.
    (volume.root / "..data" / "payments.rules").unlink()

    result = store.reload()

    assert result.ok and result.removed == ("payments",)


# --- removal and versions ---------------------------------------------------------


def test_a_removed_file_disappears_but_a_pinned_version_lives_on(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})
    store = store_of(volume, recorder)
    store.load()
    pinned = policy(store, "payments")  # as a running rollout holds it
    digest = pinned.source_hash

    volume.publish({"checkout.rules": LATENCY})
    result = store.reload()

    assert result.ok and result.removed == ("payments",)
    assert store.get("payments") is None and store.names() == ["checkout"]
    assert store.by_hash(digest) is pinned
    state = pinned.new_state()
    pinned.evaluate(0.0, {"canary.error_rate": 0.05}, state)
    assert pinned.evaluate(60.0, {"canary.error_rate": 0.05}, state).rule == "errors"

    del pinned, state
    gc.collect()
    assert store.by_hash(digest) is None  # nobody holds it any more


def test_a_file_put_back_as_it_was_returns_the_pinned_object(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    store.load()
    pinned = policy(store, "checkout")
    volume.publish({"checkout.rules": LATENCY_400})
    store.reload()

    volume.publish({"checkout.rules": LATENCY})
    store.reload()

    assert store.get("checkout") is pinned and store.version == 3


# --- watching, on fake loop time --------------------------------------------------


async def settle(seconds: float) -> None:
    """Let the watch task run for `seconds` of (fake) loop time."""
    await asyncio.sleep(seconds)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_watch_picks_up_an_update_within_one_interval(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    task = asyncio.ensure_future(store.watch(LoopClock(), interval=2.0))
    try:
        await settle(0.5)
        assert policy(store, "checkout").source == LATENCY  # watch loads first

        volume.publish({"checkout.rules": LATENCY_400})
        await settle(1.0)
        assert policy(store, "checkout").source == LATENCY  # not polled yet
        await settle(1.0)
        assert policy(store, "checkout").source == LATENCY_400
    finally:
        task.cancel()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_watch_sees_a_symlink_swap_with_equal_mtimes_and_sizes(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    stamp = 1_790_000_000 * 10**9
    volume.publish({"checkout.rules": LATENCY}, mtime_ns=stamp)
    store = store_of(volume, recorder)
    task = asyncio.ensure_future(store.watch(LoopClock(), interval=2.0))
    try:
        await settle(0.5)
        volume.publish({"checkout.rules": LATENCY_400}, mtime_ns=stamp)
        assert os.stat(volume.root / "checkout.rules").st_mtime_ns == stamp

        await settle(2.0)

        assert policy(store, "checkout").source == LATENCY_400
    finally:
        task.cancel()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_watch_reports_a_lasting_error_once_and_recovers(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    task = asyncio.ensure_future(store.watch(LoopClock(), interval=2.0))
    try:
        await settle(0.5)
        good = policy(store, "checkout")
        volume.publish({"checkout.rules": BAD})
        await settle(20.0)  # ten polls
        assert store.get("checkout") is good
        assert len(recorder.results) == 1 and recorder.failed == ["checkout"]

        volume.publish({"checkout.rules": LATENCY_400})
        await settle(2.0)
        assert policy(store, "checkout").source == LATENCY_400 and store.last_error is None
    finally:
        task.cancel()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_watch_follows_files_appearing_and_disappearing(
    volume: ConfigMapVolume, recorder: Recorder
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    store = store_of(volume, recorder)
    task = asyncio.ensure_future(store.watch(LoopClock(), interval=2.0))
    try:
        await settle(0.5)
        volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})
        await settle(2.0)
        assert store.names() == ["checkout", "payments"]

        volume.publish({"payments.rules": ERRORS})
        await settle(2.0)
        assert store.names() == ["payments"]
    finally:
        task.cancel()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_watch_waits_for_a_directory_that_appears_later(
    tmp_path: Path, recorder: Recorder
) -> None:
    root = tmp_path / "policies"
    store = PolicyStore(root, on_error=recorder.on_error, telemetry=recorder)
    task = asyncio.ensure_future(store.watch(LoopClock(), interval=2.0))
    try:
        await settle(0.5)
        assert not task.done() and len(recorder.results) == 1

        root.mkdir()
        ConfigMapVolume(root).publish({"checkout.rules": LATENCY})
        await settle(2.0)

        assert not task.done() and store.names() == ["checkout"]
    finally:
        task.cancel()


def test_the_fingerprint_reads_no_content_but_sees_a_new_file(
    volume: ConfigMapVolume,
) -> None:
    volume.publish({"checkout.rules": LATENCY})
    before = fingerprint(str(volume.root))
    assert fingerprint(str(volume.root)) == before

    volume.publish({"checkout.rules": LATENCY, "payments.rules": ERRORS})

    assert fingerprint(str(volume.root)) != before
