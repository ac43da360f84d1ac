"""The gateway handshake: the shared secret an API gateway adds to every request it forwards.

It proves a request came through the gateway (Zuplo, Kong, an ingress with auth) rather than
straight to the pod, so the gateway's own authentication and quotas cannot be bypassed. Two
secrets are accepted at once so a rotation needs no downtime: set the new one as
``GATEWAY_SHARED_SECRET`` and the old one as ``GATEWAY_SHARED_SECRET_PREVIOUS``, roll the pods,
switch the gateway, then drop the previous one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import structlog

from service.settings import Settings

log = structlog.get_logger("service.security.gateway")


def _digest(value: bytes) -> bytes:
    # Comparing fixed-length digests keeps even the secret's length out of the timing.
    return hashlib.sha256(value).digest()


class GatewaySecrets:
    """The accepted secrets, compared in constant time."""

    def __init__(self, header: str, secrets: Iterable[str]) -> None:
        self.header = header.strip().lower().encode("latin-1")
        self._digests = tuple(_digest(secret.encode()) for secret in secrets if secret)
        if not self.header or not self._digests:
            raise ValueError("a gateway header name and at least one secret are required")

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewaySecrets | None:
        """None when no secret is configured (Settings refuses that in production)."""
        if settings.gateway_shared_secret is None:
            if settings.is_production_like:
                # Production gets here only with GATEWAY_REQUIRED=false said out loud.
                log.warning("gateway_handshake_disabled", environment=settings.environment.value)
            return None
        secrets = [settings.gateway_shared_secret.get_secret_value()]
        if settings.gateway_shared_secret_previous is not None:
            secrets.append(settings.gateway_shared_secret_previous.get_secret_value())
        return cls(settings.gateway_secret_header, secrets)

    def accepts(self, presented: bytes) -> bool:
        candidate = _digest(presented)
        accepted = False
        # No early exit: the time taken does not say which secret matched, or whether one did.
        for digest in self._digests:
            accepted |= hmac.compare_digest(candidate, digest)
        return accepted
