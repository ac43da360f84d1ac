"""Where backups live (a directory: a PersistentVolumeClaim in Kubernetes) and which to keep.

A backup is two files: ``<prefix>-<UTC stamp>.dump`` (pg_dump's custom format) and, written
last, ``<prefix>-<stamp>.json`` (its manifest). The dump is written under a ``.partial`` name
and renamed when complete, and the manifest is the commit record: a backup without one never
finished and is neither restored nor counted by retention.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service.backup.pgtools import BackupError

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
PARTIAL_SUFFIX = ".partial"
# A partial file older than this belongs to a run that died (the job's deadline is far shorter).
STALE_PARTIAL = timedelta(days=1)


@dataclass(frozen=True)
class StoredBackup:
    name: str  # "<prefix>-<stamp>"
    created_at: datetime
    dump: Path
    manifest_path: Path

    def manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise BackupError(f"{self.manifest_path.name}: unreadable manifest ({exc})") from None
        return data


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(STAMP_FORMAT)


@dataclass(frozen=True)
class DirectoryStore:
    directory: Path
    prefix: str

    def _parse(self, manifest: Path) -> StoredBackup | None:
        name = manifest.name.removesuffix(".json")
        head, sep, when = name.rpartition("-")
        if not sep or head != self.prefix:
            return None
        try:
            created = datetime.strptime(when, STAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return None
        return StoredBackup(name, created, manifest.with_suffix(".dump"), manifest)

    def backups(self) -> list[StoredBackup]:
        """Complete backups, newest first."""
        if not self.directory.is_dir():
            raise BackupError(f"BACKUP_DIR {self.directory} is not a directory")
        found = [self._parse(path) for path in self.directory.glob(f"{self.prefix}-*.json")]
        return sorted((b for b in found if b is not None), key=lambda b: b.created_at, reverse=True)

    def latest(self) -> StoredBackup:
        backups = self.backups()
        if not backups:
            raise BackupError(f"no complete backup in {self.directory}")
        return backups[0]

    def new(self, created_at: datetime) -> StoredBackup:
        name = f"{self.prefix}-{stamp(created_at)}"
        backup = StoredBackup(
            name, created_at, self.directory / f"{name}.dump", self.directory / f"{name}.json"
        )
        if backup.dump.exists() or backup.manifest_path.exists():
            raise BackupError(f"{name} exists already (two backups in the same second?)")
        return backup

    def delete(self, backup: StoredBackup) -> None:
        # Manifest first: a backup half-deleted by a crash is then an orphan dump, never a
        # manifest pointing at nothing.
        backup.manifest_path.unlink(missing_ok=True)
        backup.dump.unlink(missing_ok=True)

    def remove_stale_partials(self, now: datetime) -> list[Path]:
        removed = []
        for path in self.directory.glob(f"{self.prefix}-*{PARTIAL_SUFFIX}"):
            modified = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
            if now - modified > STALE_PARTIAL:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def _newest_per_period(
    newest_first: list[datetime], period: Callable[[datetime], object], limit: int
) -> set[datetime]:
    """The first (newest) backup of each distinct period, for the ``limit`` newest periods."""
    kept: dict[object, datetime] = {}
    for moment in newest_first:
        key = period(moment.astimezone(UTC))
        if key not in kept:
            if len(kept) == limit:
                break
            kept[key] = moment
    return set(kept.values())


def _utc_day(moment: datetime) -> object:
    return moment.date()


def _iso_week(moment: datetime) -> object:
    year, week, _ = moment.date().isocalendar()
    return year, week


def backups_to_keep(
    created: Iterable[datetime], *, keep_daily: int, keep_weekly: int
) -> set[datetime]:
    """The newest backup of each of the last ``keep_daily`` days that have one, and the newest
    of each of the last ``keep_weekly`` ISO weeks that have one (UTC). Days and weeks without a
    backup do not count, so a week of failed runs never prunes the last good backups."""
    newest_first = sorted(set(created), reverse=True)
    return _newest_per_period(newest_first, _utc_day, keep_daily) | _newest_per_period(
        newest_first, _iso_week, keep_weekly
    )


def prune(store: DirectoryStore, *, keep_daily: int, keep_weekly: int) -> list[StoredBackup]:
    """Delete the backups retention does not keep; returns them."""
    backups = store.backups()
    keep = backups_to_keep(
        (b.created_at for b in backups), keep_daily=keep_daily, keep_weekly=keep_weekly
    )
    doomed = [b for b in backups if b.created_at not in keep]
    for backup in doomed:
        store.delete(backup)
    return doomed
