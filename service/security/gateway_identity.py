"""Gateway-trusted identity: the consumer the gateway authenticated becomes the principal.

With ``GATEWAY_IDENTITY_ENABLED`` the API keys can live in the gateway (Zuplo's consumers, as the
roadmap wants) instead of, or beside, the service's own. The gateway verifies the key, then names
the consumer in ``GATEWAY_CONSUMER_HEADER`` and its scopes in ``GATEWAY_CONSUMER_SCOPES_HEADER``.
Those headers are only believed on a request that also carried a valid gateway secret: the
secret is what proves the gateway, not the client, wrote them. The gateway middleware calls
:meth:`GatewayIdentity.take` after it accepted the secret, and :meth:`GatewayIdentity.presented`
to log a request that carried a consumer header without one (a forgery attempt or a caller
bypassing the gateway); either way the headers never reach a handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from service.security.principal import Principal, owner_id_from
from service.settings import Settings

log = structlog.get_logger("service.security.gateway_identity")

# A consumer id is a name or a UUID; anything longer is not something a gateway wrote.
MAX_CONSUMER_ID_LENGTH = 200

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class GatewayIdentity:
    consumer_header: bytes
    scopes_header: bytes | None
    default_scopes: frozenset[str]
    allowed_scopes: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayIdentity | None:
        if not settings.gateway_identity_enabled:
            return None
        scopes_header = settings.gateway_consumer_scopes_header
        return cls(
            consumer_header=settings.gateway_consumer_header.lower().encode("latin-1"),
            scopes_header=scopes_header.lower().encode("latin-1") if scopes_header else None,
            default_scopes=frozenset(settings.gateway_consumer_default_scopes),
            allowed_scopes=frozenset(settings.gateway_consumer_allowed_scopes),
        )

    @property
    def _names(self) -> tuple[bytes, ...]:
        return (self.consumer_header, self.scopes_header or b"")

    def presented(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether the request carries a consumer header at all."""
        return any(name == self.consumer_header for name, _ in headers)

    def take(self, headers: Headers) -> tuple[Principal | None, Headers]:
        """The gateway's consumer as a principal (None if it named none, or named it badly),
        and the headers without the identity headers."""
        consumers = [value for name, value in headers if name == self.consumer_header]
        remaining = [(name, value) for name, value in headers if name not in self._names]
        if not consumers:
            return None, remaining
        consumer = _consumer_id(consumers)
        if consumer is None:
            # Two values, or one no gateway would write: something between the gateway and us
            # added or mangled it. Not trusted; the request goes on without an identity.
            log.warning("gateway_consumer_rejected", reason="malformed or repeated header")
            return None, remaining
        principal = Principal(
            owner_id=owner_id_from(consumer),
            scopes=self._scopes(headers),
            auth_method="gateway",
            credential_id=consumer,
        )
        return principal, remaining

    def _scopes(self, headers: Headers) -> frozenset[str]:
        if self.scopes_header is None:
            return self.default_scopes
        values = [value for name, value in headers if name == self.scopes_header]
        if not values:
            return self.default_scopes
        granted: set[str] = set()
        for value in values:
            granted.update(value.decode("latin-1").replace(",", " ").split())
        # The gateway's word is bounded by this list: a consumer misconfigured in the gateway
        # with "admin" gets no more than the operator allowed here.
        return frozenset(granted) & self.allowed_scopes


def _consumer_id(values: list[bytes]) -> str | None:
    if len(values) != 1:
        return None
    try:
        consumer = values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not consumer or len(consumer) > MAX_CONSUMER_ID_LENGTH or not consumer.isprintable():
        return None
    return consumer
