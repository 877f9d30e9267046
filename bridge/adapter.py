"""The one shape every queue adapter has: built from its config section, started, stopped."""

from __future__ import annotations

from typing import Literal, Protocol, TypedDict, runtime_checkable

ConsumerState = Literal["joining", "consuming", "paused", "no partitions assigned", "stopped"]


class ConsumerReadiness(TypedDict):
    """One Kafka consumer as ``/readyz`` shows it to token holders (docs/kafka.md#readiness)."""

    check: str  # the name of its readiness check: kafka:{topics}
    group_id: str
    topics: list[str]
    state: ConsumerState
    assigned_partitions: int
    missing_topics: list[str]  # subscribed, but not in the cluster's metadata


@runtime_checkable
class Adapter(Protocol):
    """A queue adapter. ``stop`` must leave nothing acknowledged that Temporal does not hold."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def healthy(self) -> bool: ...

    def ended(self) -> str | None:
        """What ended its consuming loop when that happened without a stop, else None."""
        ...
