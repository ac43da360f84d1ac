"""Entity tags for tasks (RFC 9110 section 8.8.3) and the conditional request headers.

A task's ETag is its version as a strong tag: ``"3"``. The version changes with every write, so
it validates the whole representation; the id needs no place in it because an ETag is scoped to
its URL.

Proxies that compress responses (nginx ``gzip``) turn a strong tag into a weak one. A client
behind such a proxy can only send back ``W/"3"``, so ``If-Match`` accepts the weak form too:
the version is the task's state, whatever the encoding of the bytes it was read through.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import DomainError

MAX_VERSION = 2**31 - 1
# A client holds one representation, perhaps a few; a list longer than this is not a real
# precondition, and each tag would be a bind parameter of the conditional UPDATE.
MAX_ENTITY_TAGS = 32


class TooManyEntityTagsError(DomainError):
    status, slug, title = 400, "too-many-entity-tags", "Too many entity tags"


def etag_for(version: int) -> str:
    return f'"{version}"'


@dataclass(frozen=True, slots=True)
class ETagCondition:
    """A parsed ``If-Match`` / ``If-None-Match``: ``*`` or a set of task versions."""

    any: bool
    versions: frozenset[int]

    def matches(self, version: int) -> bool:
        return self.any or version in self.versions


def parse_etag_condition(header: str | None) -> ETagCondition | None:
    """``None`` for an absent header. Tags this server never issued match nothing."""
    if header is None:
        return None
    if header.strip() == "*":
        return ETagCondition(any=True, versions=frozenset())
    if header.count(",") >= MAX_ENTITY_TAGS:
        raise TooManyEntityTagsError(
            f"If-Match and If-None-Match take at most {MAX_ENTITY_TAGS} entity tags"
        )
    versions: set[int] = set()
    for raw in header.split(","):
        tag = raw.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if len(tag) < 3 or tag[0] != '"' or tag[-1] != '"':
            continue
        opaque = tag[1:-1]
        # Versions are int4 in the database; anything larger cannot be one of ours.
        if opaque.isascii() and opaque.isdigit() and len(opaque) <= 10:
            version = int(opaque)
            # Tags compare as strings: "01" is not the "1" we issued.
            if 1 <= version <= MAX_VERSION and str(version) == opaque:
                versions.add(version)
    return ETagCondition(any=False, versions=frozenset(versions))
