"""free_port: the port it picks for another process is one the kernel will not hand out meanwhile."""

from __future__ import annotations

import socket

import pytest

from bridge.runtime import embedded
from bridge.runtime.embedded import free_port


def test_a_free_preferred_port_is_kept() -> None:
    port = free_port()
    assert free_port(port) == port


def test_a_taken_preferred_port_gives_another_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port(busy)
        assert port != busy
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


def test_ports_are_chosen_below_the_ephemeral_range() -> None:
    low = embedded._ephemeral_low()
    ports = {free_port() for _ in range(50)}
    assert all(embedded._LOWEST <= p < low for p in ports), sorted(ports)
    assert len(ports) > 1  # chosen at random, not one fixed port each time


def test_no_room_below_the_range_falls_back_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_low = embedded._ephemeral_low()
    monkeypatch.setattr(embedded, "_ephemeral_low", lambda: embedded._LOWEST)
    port = free_port()
    assert port >= kernel_low  # the kernel's choice
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
