"""The one shape every queue adapter has: built from its config section, started, stopped."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Adapter(Protocol):
    """A queue adapter. ``stop`` must leave nothing acknowledged that Temporal does not hold."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def healthy(self) -> bool: ...
