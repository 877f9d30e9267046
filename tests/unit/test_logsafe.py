"""Sender-controlled values in log lines: escaped and truncated."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.logsafe import MAX_LOGGED, safe


def test_newlines_and_control_characters_are_escaped() -> None:
    assert safe("order.created\nFAKE 200 accepted") == "order.created\\nFAKE 200 accepted"
    assert safe("a\x1b[31mred\r") == "a\\x1b[31mred\\r"


def test_long_values_are_cut_with_a_count_of_what_was_left_out() -> None:
    out = safe("x" * 1_000_000)
    assert out.startswith("x" * MAX_LOGGED) and out.endswith("…(+999800)")


def test_plain_values_pass_unchanged() -> None:
    assert safe("order.created") == "order.created"
    assert safe(None) == "-"
    assert safe(42) == "42"


@given(st.text(max_size=2000))
def test_any_text_becomes_one_bounded_printable_line(text: str) -> None:
    out = safe(text)
    assert out.isprintable()
    assert len(out) <= MAX_LOGGED * 10 + 20  # an escaped character takes at most 10 ('\U0010ffff')
