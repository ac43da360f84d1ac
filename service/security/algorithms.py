"""Which JWT algorithms may verify a token, given the configured key sources.

Dependency-free on purpose: Settings validates ``JWT_ALGORITHMS`` with it at start-up, and the
verifier enforces the same narrowed list on every token.
"""

from __future__ import annotations

from collections.abc import Iterable

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# "none" is deliberately absent: an unsigned token is never acceptable.
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS


def effective_algorithms(
    configured: Iterable[str], *, has_secret: bool, has_jwks: bool
) -> frozenset[str]:
    """The configured allow-list narrowed to what the configured key sources can verify.

    HMAC algorithms only with a shared secret, asymmetric ones only with a JWKS: a token can then
    never get its public key used as an HMAC secret (algorithm confusion).
    """
    allowed = set(configured) & SUPPORTED_ALGORITHMS
    if not has_secret:
        allowed -= HMAC_ALGORITHMS
    if not has_jwks:
        allowed -= ASYMMETRIC_ALGORITHMS
    return frozenset(allowed)
