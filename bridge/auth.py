"""Bearer tokens, compared in constant time; part of the config snapshot, so a reload revokes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


class Tokens:
    """The ``http.auth.tokens`` of one snapshot, each known by its name (``token-{n}`` for a plain
    string, or the name given in the config). The name scopes the events sent with the token and
    keys its rate limit; the token itself never leaves this object."""

    def __init__(self, tokens: Sequence[tuple[str, str]]) -> None:
        # Their digests are compared, not the tokens: compare_digest answers at once for inputs of
        # different lengths, so the time taken told each configured token's length.
        self._tokens = tuple((name, _digest(token.encode())) for name, token in tokens if token)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, authorization: str | None) -> str | None:
        """The name of the token an ``Authorization: Bearer …`` header carries, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip().encode())
        found = None
        for name, expected in self._tokens:
            # Every token is compared, so the time taken does not say which one matched.
            if hmac.compare_digest(given, expected) and found is None:
                found = name
        return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()
