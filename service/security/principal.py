"""Who is calling, and what they may do: the seam every route's authorisation goes through."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

# Owner ids are UUIDs. A name ("alice", a JWT ``sub`` that is not a UUID) maps to a stable UUID
# in this namespace, so the same name always owns the same tasks.
OWNER_NAMESPACE = uuid.UUID("6f1b3c2e-6a52-4b8e-9a53-2a1d8f3b7c01")


class Scope(StrEnum):
    TASKS_READ = "tasks:read"
    TASKS_WRITE = "tasks:write"
    ADMIN = "admin"


def owner_id_from(value: str) -> uuid.UUID:
    """A UUID as given, or the stable UUID of a name."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.uuid5(OWNER_NAMESPACE, value)


@dataclass(frozen=True, slots=True)
class Principal:
    owner_id: uuid.UUID
    scopes: frozenset[str]
    auth_method: Literal["api_key", "jwt", "gateway"]
    # Safe to log: the key's public prefix, the token's subject or the gateway's consumer id,
    # never the credential.
    credential_id: str

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or Scope.ADMIN.value in self.scopes
