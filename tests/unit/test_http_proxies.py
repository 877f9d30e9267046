"""The client's address behind a proxy: X-Forwarded-For is believed of the trusted proxies only.

Behind a load balancer every request came from its address, and the share of unsigned webhook
requests one address may hold in flight (until the signature is checked) was everyone's: anyone
trickling unsigned bodies held the providers' deliveries out (429)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import HttpConfig
from bridge.errors import ConfigError
from bridge.runtime.app import server_config
from tests.unit.http_support import make_config


async def client_seen(http: HttpConfig, peer: str, forwarded: str | None) -> str:
    """The client address the app sees for a request from ``peer`` with that X-Forwarded-For."""
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["client"][0])

    config = server_config(app, http)
    config.load()
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    scope = {"type": "http", "client": (peer, 5000), "headers": headers, "scheme": "http"}

    async def nothing() -> dict[str, Any]:
        return {}

    async def ignore(message: Any) -> None:
        return None

    await config.loaded_app(scope, nothing, ignore)
    return seen[0]


async def test_a_trusted_proxy_names_the_client_and_no_one_else_does() -> None:
    http = make_config(trusted_proxies=["10.0.0.0/8"]).http
    assert await client_seen(http, "10.1.2.3", "203.0.113.9") == "203.0.113.9"
    assert await client_seen(http, "198.51.100.7", "203.0.113.9") == "198.51.100.7"  # not a proxy of ours
    assert await client_seen(http, "10.1.2.3", None) == "10.1.2.3"


async def test_by_default_only_a_proxy_on_this_host_is_believed() -> None:
    http = make_config().http
    assert await client_seen(http, "127.0.0.1", "203.0.113.9") == "203.0.113.9"
    assert await client_seen(http, "::1", "203.0.113.9") == "203.0.113.9"
    assert await client_seen(http, "10.1.2.3", "203.0.113.9") == "10.1.2.3"
    nobody = make_config(trusted_proxies=[]).http
    assert await client_seen(nobody, "127.0.0.1", "203.0.113.9") == "127.0.0.1"


@pytest.mark.parametrize("proxy", ["*", "lb.internal", "10.0.0.0/33", "10.1.2.3/8"])
def test_a_proxy_is_trusted_by_its_address_or_network_only(proxy: str) -> None:
    with pytest.raises(ConfigError, match="no IP address or network"):
        make_config(trusted_proxies=[proxy])
