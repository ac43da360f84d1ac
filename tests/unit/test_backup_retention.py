"""Retention: exactly the newest backup of each of N days and of each of M ISO weeks is kept."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.backup.store import DirectoryStore, backups_to_keep, prune, stamp

T0 = datetime(2026, 3, 16, 2, 0, tzinfo=UTC)  # a Monday


def at(days: float, hours: float = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours)


def test_daily_keeps_the_newest_backup_of_each_of_the_last_n_days() -> None:
    backups = [at(d, h) for d in range(10) for h in (0, 12)]
    keep = backups_to_keep(backups, keep_daily=3, keep_weekly=0)
    assert keep == {at(9, 12), at(8, 12), at(7, 12)}


def test_weekly_keeps_the_newest_backup_of_each_iso_week() -> None:
    backups = [at(d) for d in range(35)]  # five ISO weeks, Monday to Sunday
    keep = backups_to_keep(backups, keep_daily=1, keep_weekly=3)
    # Newest day; then the Sunday of the newest three weeks (the newest week's is that day).
    assert keep == {at(34), at(27), at(20)}


def test_days_without_backups_do_not_count() -> None:
    # A week of failed runs: the three last good backups stay, however old.
    backups = [at(0), at(1), at(2), at(30)]
    assert backups_to_keep(backups, keep_daily=3, keep_weekly=0) == {at(30), at(2), at(1)}


def test_days_are_utc_days() -> None:
    evening, late = (
        datetime(2026, 3, 16, 22, 0, tzinfo=UTC),
        datetime(2026, 3, 16, 23, 30, tzinfo=UTC),
    )
    after_midnight = datetime(2026, 3, 17, 0, 30, tzinfo=UTC)
    keep = backups_to_keep([evening, late, after_midnight], keep_daily=2, keep_weekly=0)
    assert keep == {after_midnight, late}


def _write(directory: Path, prefix: str, moment: datetime, *, manifest: bool = True) -> str:
    name = f"{prefix}-{stamp(moment)}"
    (directory / f"{name}.dump").write_bytes(b"PGDMP")
    if manifest:
        (directory / f"{name}.json").write_text("{}")
    return name


def test_prune_deletes_exactly_what_retention_does_not_keep(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, "app")
    names = {moment: _write(tmp_path, "app", moment) for moment in (at(d) for d in range(21))}
    other = _write(tmp_path, "other-app", at(0))  # another release's backups are not ours
    unfinished = _write(tmp_path, "app", at(-1), manifest=False)  # never completed
    pruned = prune(store, keep_daily=2, keep_weekly=2)
    kept = {at(20), at(19), at(13)}
    assert {b.name for b in pruned} == {names[m] for m in names if m not in kept}
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = sorted(
        [f"{names[m]}.{ext}" for m in kept for ext in ("dump", "json")]
        + [f"{other}.dump", f"{other}.json", f"{unfinished}.dump"]
    )
    assert left == expected
    assert [b.created_at for b in store.backups()] == sorted(kept, reverse=True)


def test_stale_partials_are_removed_fresh_ones_are_not(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, "app")
    stale = tmp_path / "app-20260101T000000Z.dump.partial"
    fresh = tmp_path / "app-20260316T000000Z.dump.partial"
    for path in (stale, fresh):
        path.write_bytes(b"x")
    two_days_ago = (T0 - timedelta(days=2)).timestamp()
    os.utime(stale, (two_days_ago, two_days_ago))
    os.utime(fresh, (T0.timestamp(), T0.timestamp()))
    assert store.remove_stale_partials(T0 + timedelta(hours=1)) == [stale]
    assert fresh.exists()


def test_a_second_backup_in_the_same_second_is_refused(tmp_path: Path) -> None:
    from service.backup.pgtools import BackupError

    store = DirectoryStore(tmp_path, "app")
    _write(tmp_path, "app", T0)
    with pytest.raises(BackupError, match="exists already"):
        store.new(T0)
