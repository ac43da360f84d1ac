"""Logical backups (pg_dump) and the restore drill that proves they restore.

``python -m service backup`` and ``python -m service restore-drill``; see docs/backup-restore.md.
"""
