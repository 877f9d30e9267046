"""Bearer tokens: the comparison tells nothing of a configured token, not even its length."""

from __future__ import annotations

import hmac
from typing import Any
from unittest import mock

import pytest

from bridge.auth import Tokens

TOKENS = Tokens([("short", "abc"), ("long", "x" * 64)])


@pytest.mark.parametrize("given", ["a", "abc", "x" * 64, "y" * 500])
def test_every_comparison_is_of_equal_lengths_whatever_was_sent(given: str) -> None:
    """compare_digest answers at once when the lengths differ: comparing the tokens themselves,
    how long a wrong token took told how long each configured one is."""
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    with mock.patch("bridge.auth.hmac.compare_digest", spy):
        TOKENS.match(f"Bearer {given}")
    assert len(seen) == 2 and all(a == b == 32 for a, b in seen), seen


def test_a_token_matches_its_own_name_only() -> None:
    assert TOKENS.match("Bearer abc") == "short"
    assert TOKENS.match("Bearer " + "x" * 64) == "long"
    assert TOKENS.match("Bearer abd") is None and TOKENS.match("Basic abc") is None and TOKENS.match(None) is None
