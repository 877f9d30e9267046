"""Host names in the config: ``runner.allow_hosts`` entries, read once into (host, port)."""

from __future__ import annotations

import ipaddress
import re


def parse_host(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, an IP, ``[v6]:port``: the lower-cased host (an IP in its canonical
    form) and the port, or None for any port. ValueError says what is wrong."""
    text = entry.strip().lower()
    port: str | None = None
    if not text or re.search(r"[/@?#\s]", text):
        raise ValueError(f"{entry!r} is not a hostname or an IP address (optionally with :port)")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: write an IPv6 address as [address] or [address]:port")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    host = host.rstrip(".")
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", host) or ".." in host:
            raise ValueError(f"{entry!r} is not a hostname or an IP address (optionally with :port)") from None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port)
