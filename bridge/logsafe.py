"""Values from senders, made safe to log: one line, printable, bounded."""

from __future__ import annotations

MAX_LOGGED = 200


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def safe(value: object, limit: int = MAX_LOGGED) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus a marker when cut).

    Control characters (newlines included) are escaped, so a sender cannot forge log lines; a
    megabyte-long event name costs a log line its first ``limit`` characters.
    """
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    text = text[:limit]
    if not text.isprintable():
        text = printable(text)
    return f"{text}…(+{len(value if isinstance(value, str) else str(value)) - limit})" if cut else text
