"""Bearer tokens, compared in constant time; part of the config snapshot, so a reload revokes."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class Tokens:
    """The ``http.auth.tokens`` of one snapshot. Each token is known by a name, ``token-{n}``, that
    keys rate limits and logs; the token itself never leaves this object."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, authorization: str | None) -> str | None:
        """The name of the token an ``Authorization: Bearer …`` header carries, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found = None
        for i, expected in enumerate(self._tokens):
            # Every token is compared, so the time taken does not say which one matched.
            if hmac.compare_digest(given, expected) and found is None:
                found = f"token-{i + 1}"
        return found
