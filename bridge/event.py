"""`EventSignal`, the one message type that crosses from an adapter into Temporal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

# One signal carries at most this much encoded JSON: half of Temporal's 2 MiB payload limit.
MAX_SIGNAL_BYTES = 1024 * 1024
# One event, encoded, at most this much. Each of its runs' argument carries its payload twice
# (``input`` and ``trigger``) beside its envelope, within the dispatcher's MAX_TARGET_BYTES (1,920
# KiB, under Temporal's 2 MiB): an event of 983 KB to 1 MiB was accepted, then every start of it
# failed. 944 KiB leaves the argument 32 KiB for the entry's id and the rest.
MAX_EVENT_BYTES = 944 * 1024
# An event's id and its name, each at most this many characters. Both go into each of its runs'
# argument and memo (and, cut to fit, its search attributes), and the dispatcher sizes a batch of
# starts by its events' sizes: an id of hundreds of KB could take a batch's activity input past
# Temporal's 2 MiB, and the server then ends the dispatcher run with all it holds.
MAX_KEY_CHARS = 4096
REPLAY_ID_PREFIX = "replay:"
"""How the ids of events sent by ``signal-bridge replay runs`` begin (with ``metadata.replay``, which
only the replay sets): the pipeline refuses any other event whose id begins so."""
REPLAY_KEY = "replay"
"""``metadata.replay`` of an event sent by ``replay runs``: ``number``, ``of`` (the original id),
``at`` and, with ``--to``, ``to`` (the one workflow entry it is for)."""


MAX_SIGNAL_DEPTH = 1000
"""Containers nested in one event a dispatcher takes. The adapters pass 100 at most; a client of the
namespace that is not the bridge may send any depth, and past about 2,400 the SDK cannot encode the
starts' arguments (the event was taken, then never started) nor, deeper, the event itself (the
workflow task failed on every attempt: the dispatcher stalled)."""


def nested_deeper(value: Any, limit: int) -> bool:
    """True when ``value`` nests dicts and lists deeper than ``limit``, found without recursing:
    one level of containers at a time (two and a half times as fast as a stack of (item, depth)
    pairs on a payload of 300,000 empty lists, which a dispatcher checks in its workflow task)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            below.extend([c for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, dict | list)])
        level = below
        depth += 1
    return False


@dataclass
class EventSignal:
    """An event, stripped of its transport.

    ``id`` is stable across redeliveries of the same event, and ``source`` is the scope its adapter
    set (never the sender): with the project, ``(source, id)`` names the event, and every target
    run derives its workflow id from it (:func:`run_digest`).
    ``key`` is the ordering key (the Kafka record key, or the adapter's ``event.key_from``) that picks
    the dispatcher shard.
    """

    id: str
    name: str
    payload: dict[str, Any]
    source: str
    time: str = field(default_factory=lambda: utc_now())
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies the payload, which the dispatcher cannot afford.
        return {
            "id": self.id,
            "name": self.name,
            "payload": self.payload,
            "source": self.source,
            "time": self.time,
            "metadata": self.metadata,
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventSignal:
        if not isinstance(data, dict):
            raise TypeError(f"an event must be an object, not {type(data).__name__}")
        payload = data.get("payload")
        key = data.get("key")
        if key is not None and not isinstance(key, str):  # it orders events: a dict key hashes nothing
            raise TypeError(f"an event's key must be a string, not {type(key).__name__}")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            payload=payload if isinstance(payload, dict) else {},
            source=str(data.get("source") or ""),
            time=str(data.get("time") or ""),
            metadata=dict(data.get("metadata") or {}),
            key=key,
        )

    def envelope(self) -> dict[str, Any]:
        """What a target sees as ``event``: everything but the payload."""
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "time": self.time,
            "metadata": self.metadata,
        }


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


def run_digest(project: str, scope: str, event_id: str) -> str:
    """A short, stable name for one event of one project, as its adapter scoped it.

    ``scope`` is set by the adapter, never by the sender (``http:{token name}``, ``webhook:{slug}``,
    ``kafka:{topic}``, ``amqp:{queue}``: the event's ``source``), so nothing sent through one
    credential or adapter can name an event of another; the project keeps two projects in one
    namespace apart. 80 bits keep collisions out of reach. See docs/configuration.md, "Event ids".
    """
    return hashlib.sha256(f"{project}\x00{scope}\x00{event_id}".encode()).hexdigest()[:20]


def cloudevent_id(source: str, event_id: str) -> str:
    """A CloudEvent's event id: its ``source`` and ``id`` together (unique per the spec)."""
    return f"{source}#{event_id}"


def target_workflow_id(workflow_id: str, digest: str) -> str:
    """The run id of one (target, event): Temporal's id uniqueness refuses a second start."""
    return f"{workflow_id}-{digest}"


def content_digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()


def encoded_size(item: dict[str, Any]) -> int:
    """Bytes of ``item`` as compact JSON: what it weighs in a signal."""
    return len(json.dumps(item, separators=(",", ":"), default=str))


def encode(item: dict[str, Any]) -> bytes:
    """``item`` as the signal carries it: the JSON the Temporal SDK's ``json/plain`` converter
    writes (compact, keys sorted, ASCII), so an event is encoded once: its length is what it
    weighs in a signal (:func:`encoded_size`, for JSON values), and the signal's list of events
    is these joined (``[a,b,…]``), byte for byte what the SDK would write for the list.

    Values JSON has no type for are written as that converter writes them (datetimes as ISO
    8601, dataclasses as objects, other iterables as arrays); anything else as its ``str``
    (where the SDK would fail the signal)."""
    return _ENCODER.encode(item).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Iterable):
        return list(value)
    return str(value)


# Made once: json.dumps with any option builds an encoder per call, as long as the encoding itself.
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=_json_default)
