"""The search attributes every target run carries, so any event's runs can be found in Temporal.

``SignalBridgeEventId``, ``SignalBridgeEventName``, ``SignalBridgeSource`` and
``SignalBridgeProject``, all Keyword. The embedded dev server registers them at start;
``signal-bridge setup`` registers them on a real server through the operator API. A worker that
finds them missing says so at start and starts runs without them (a start naming an unregistered
attribute would fail): runs still start, only the look-up by event loses them. A value too long
for an attribute is cut to its start and a digest of the whole (:func:`fit`); the run's memo keeps
it whole.
"""

from __future__ import annotations

import hashlib
import json

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from bridge.event import EventSignal

EVENT_ID = SearchAttributeKey.for_keyword("SignalBridgeEventId")
EVENT_NAME = SearchAttributeKey.for_keyword("SignalBridgeEventName")
SOURCE = SearchAttributeKey.for_keyword("SignalBridgeSource")
PROJECT = SearchAttributeKey.for_keyword("SignalBridgeProject")
KEYS = (EVENT_ID, EVENT_NAME, SOURCE, PROJECT)
NAMES = tuple(k.name for k in KEYS)


def quoted(value: str) -> str:
    """A string literal for a visibility query."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Temporal refuses a start whose attribute value is over 2 KiB (its default limit) as the SDK
# encodes it: JSON, with every character past ASCII escaped (6 or 12 bytes). Values over this many
# bytes are cut (:func:`fit`), so an event with a long id or name still starts.
MAX_VALUE_BYTES = 1000
_DIGEST_CHARS = 32
_CUT = "…"


def _size(text: str) -> int:
    return len(json.dumps(text)) - 2


_KEPT_BYTES = MAX_VALUE_BYTES - _size(_CUT) - _DIGEST_CHARS  # of a cut value's start


def fit(text: str) -> str:
    """``text`` as an attribute value: itself when it fits, else its start (:func:`fit_prefix`),
    ``…`` and 32 hex digits of the SHA-256 of the whole (one value per text, so a look-up computes
    the same)."""
    if _size(text) <= MAX_VALUE_BYTES:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    return fit_prefix(text) + _CUT + digest


def fit_prefix(text: str) -> str:
    """The start of ``text`` that :func:`fit` keeps of a long text (the longest whose encoding
    takes at most ``_KEPT_BYTES``): as a ``STARTS_WITH`` operand, it matches every value whose
    text starts with ``text``."""
    used = 0
    for i, char in enumerate(text):
        used += _size(char)
        if used > _KEPT_BYTES:
            return text[:i]
    return text


def values(event: EventSignal, project: str) -> dict[str, str]:
    """The attributes of one event's runs, as plain data a workflow may pass to an activity."""
    return {
        EVENT_ID.name: fit(event.id),
        EVENT_NAME.name: fit(event.name),
        SOURCE.name: fit(event.source),
        PROJECT.name: fit(project),
    }


def typed(plain: dict[str, str] | None) -> TypedSearchAttributes:
    """:func:`values` (or nothing) as what ``start_workflow`` takes; keys that are not ours are ignored."""
    if not plain:
        return TypedSearchAttributes.empty
    return TypedSearchAttributes([SearchAttributePair(k, plain[k.name]) for k in KEYS if k.name in plain])


def dev_server_flags() -> list[str]:
    """``temporal server start-dev`` arguments that register the attributes."""
    return [arg for name in NAMES for arg in ("--search-attribute", f"{name}=Keyword")]


async def missing(client: Client, namespace: str) -> list[str]:
    """The attributes the namespace lacks (all of them when it cannot tell)."""
    answer = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    known = set(answer.custom_attributes) | set(answer.system_attributes)
    return [name for name in NAMES if name not in known]


async def register(client: Client, namespace: str) -> list[str]:
    """Register the missing ones as Keyword; returns the names it added."""
    absent = await missing(client, namespace)
    if absent:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=namespace,
                search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in absent},
            )
        )
    return absent
