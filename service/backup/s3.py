"""S3-compatible storage for backups: the directory is the staging area, the bucket the store.

After a backup completes in ``BACKUP_DIR`` its dump and then its manifest are uploaded (the
manifest last, so a listing never shows a manifest without its dump) and retention runs on the
bucket with the same rule as on a directory. The drill downloads the latest complete backup
into a temporary directory and restores from there. Credentials come from
``BACKUP_S3_ACCESS_KEY_ID``/``BACKUP_S3_SECRET_ACCESS_KEY`` when set, else from boto3's own chain
(workload identity: IRSA, GKE/Azure federation, instance profiles), which is the better choice
in a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.backup.pgtools import BackupError
from service.backup.store import STAMP_FORMAT, StoredBackup, backups_to_keep
from service.settings import Settings


@dataclass(frozen=True)
class S3Object:
    name: str  # "<prefix>-<stamp>"
    created_at: datetime


@dataclass
class S3Store:
    client: Any
    bucket: str
    key_prefix: str  # "" or "path/" inside the bucket
    name_prefix: str  # the backups' file-name prefix (APP_NAME)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3  # type: ignore[import-untyped]

        assert settings.backup_s3_bucket is not None
        options: dict[str, Any] = {}
        if settings.backup_s3_endpoint_url:
            options["endpoint_url"] = settings.backup_s3_endpoint_url
        if settings.backup_s3_region:
            options["region_name"] = settings.backup_s3_region
        if settings.backup_s3_access_key_id is not None:
            assert settings.backup_s3_secret_access_key is not None
            options["aws_access_key_id"] = settings.backup_s3_access_key_id.get_secret_value()
            options["aws_secret_access_key"] = (
                settings.backup_s3_secret_access_key.get_secret_value()
            )
        prefix = settings.backup_s3_prefix.strip("/")
        return cls(
            boto3.client("s3", **options),
            settings.backup_s3_bucket,
            f"{prefix}/" if prefix else "",
            settings.app_name,
        )

    def _key(self, file_name: str) -> str:
        return f"{self.key_prefix}{file_name}"

    def backups(self) -> list[S3Object]:
        """Complete backups (a manifest is present), newest first."""
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=self._key(self.name_prefix)))
        except Exception as exc:
            raise BackupError(f"s3://{self.bucket}: listing failed: {exc}") from None
        for page in pages:
            for item in page.get("Contents", []):
                file_name = item["Key"].removeprefix(self.key_prefix)
                if not file_name.endswith(".json"):
                    continue
                name = file_name.removesuffix(".json")
                head, sep, when = name.rpartition("-")
                if not sep or head != self.name_prefix:
                    continue
                try:
                    created = datetime.strptime(when, STAMP_FORMAT).replace(tzinfo=UTC)
                except ValueError:
                    continue
                found.append(S3Object(name, created))
        return sorted(found, key=lambda b: b.created_at, reverse=True)

    def upload(self, backup: StoredBackup) -> None:
        try:
            self.client.upload_file(str(backup.dump), self.bucket, self._key(backup.dump.name))
            self.client.upload_file(
                str(backup.manifest_path), self.bucket, self._key(backup.manifest_path.name)
            )
        except Exception as exc:
            raise BackupError(f"upload to s3://{self.bucket} failed: {exc}") from None

    def download_latest(self, directory: Path) -> None:
        """The latest complete backup's two files, into ``directory``."""
        backups = self.backups()
        if not backups:
            raise BackupError(f"no complete backup in s3://{self.bucket}/{self.key_prefix}")
        name = backups[0].name
        for suffix in (".dump", ".json"):
            try:
                self.client.download_file(
                    self.bucket, self._key(name + suffix), str(directory / (name + suffix))
                )
            except Exception as exc:
                raise BackupError(f"download of {name}{suffix} failed: {exc}") from None

    def prune(self, *, keep_daily: int, keep_weekly: int) -> list[S3Object]:
        backups = self.backups()
        keep = backups_to_keep(
            (b.created_at for b in backups), keep_daily=keep_daily, keep_weekly=keep_weekly
        )
        doomed = [b for b in backups if b.created_at not in keep]
        for backup in doomed:
            # Manifest first, as on a directory: never a manifest without its dump.
            for suffix in (".json", ".dump"):
                self.client.delete_object(Bucket=self.bucket, Key=self._key(backup.name + suffix))
        return doomed
