"""API-key authentication: the `Authenticator` filling `services.auth`.

`Authorization: Bearer sk-...` is checked against the stored key hashes (storage/key_lookup.py,
cached in-process for `DS_KEY_CACHE_TTL_S`). Every failure is a 401 in OpenAI's error shape, with a
`code` telling which: missing_api_key, invalid_api_key, expired_api_key, revoked_api_key. If the key
store is unreachable and the key is not cached, the answer is 503 (the key may well be valid).
"""

from __future__ import annotations

from deepseek_serve.contracts import Principal
from deepseek_serve.serving.failures import UNAVAILABLE_RETRY_AFTER_S, AuthError, ServiceUnavailableError
from deepseek_serve.storage.key_lookup import KeyLookup, KeyStatus, KeyStoreUnavailable

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def mask_key(secret: str) -> str:
    """`sk-abcd...wxyz` style, safe to echo back (never the whole secret)."""
    if len(secret) <= 12:
        return "*" * len(secret)
    return f"{secret[:7]}***{secret[-4:]}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of a `Bearer` header value, or None when absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeyAuthenticator:
    """Implements contracts.Authenticator over a KeyLookup."""

    def __init__(self, lookup: KeyLookup) -> None:
        self.lookup = lookup

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller's Principal; raises AuthError (401) or ServiceUnavailableError (503)."""
        secret = bearer_token(authorization)
        if secret is None:
            raise AuthError(MISSING_KEY_MESSAGE, code="missing_api_key")
        try:
            check = await self.lookup.check(secret)
        except KeyStoreUnavailable:
            raise ServiceUnavailableError(
                "API keys cannot be checked right now: the database is unreachable. Retry shortly.",
                code="auth_unavailable",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            ) from None
        if check.status is KeyStatus.OK and check.key is not None:
            key = check.key
            return Principal(
                key_id=key.id, name=key.name, scopes=key.scopes, rpm_limit=key.rpm_limit, tpm_limit=key.tpm_limit
            )
        if check.status is KeyStatus.EXPIRED:
            raise AuthError(f"The API key {mask_key(secret)} has expired.", code="expired_api_key")
        if check.status is KeyStatus.REVOKED:
            raise AuthError(f"The API key {mask_key(secret)} has been revoked.", code="revoked_api_key")
        raise AuthError(f"Incorrect API key provided: {mask_key(secret)}.", code="invalid_api_key")
