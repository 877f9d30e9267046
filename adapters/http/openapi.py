"""The OpenAPI document (``/schema/openapi.json``): what a client generator needs.

Handlers read their body as raw bytes (signatures, size limits, CloudEvents binary mode), so
litestar sees no ``data`` parameter to describe; the request bodies are written out here and set
by each operation's class. Error answers are derived from the reasons a handler can produce and
:data:`bridge.errors.HTTP_STATUS`, so the document lists every status with the error body's
schema. The API itself: docs/http-api.md and docs/webhooks.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from litestar import Router
from litestar.enums import ParamType
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
    SecurityRequirement,
    SecurityScheme,
)

from adapters.http.answers import ErrorBody
from adapters.http.parse import CE_BATCH
from adapters.http.state import NEEDS_TOKEN, needs_token
from bridge.decode import CE_STRUCTURED, INT_MAX, INT_MIN, MAX_JSON_DEPTH
from bridge.errors import HTTP_STATUS, Reason
from bridge.event import MAX_KEY_CHARS

BEARER = "bearer"
BEARER_AUTH: list[SecurityRequirement] = [{BEARER: []}]

# The event id of a CloudEvent is "{source}#{id}": each at most half of what an id may hold.
_CE_PART = Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_KEY_CHARS // 2 - 1)

_JSON_LIMITS = f"Nested at most {MAX_JSON_DEPTH} deep, no NaN or Infinity, integers within 64 bits."
_CE_EXTENSION = Schema(
    any_of=[
        Schema(type=OpenAPIType.STRING),
        Schema(type=OpenAPIType.BOOLEAN),
        Schema(type=OpenAPIType.INTEGER, minimum=-(2**31), maximum=2**31 - 1),
    ],
    description="An extension attribute: a CloudEvents string, boolean or (32-bit) integer.",
)

ENVELOPE = Schema(
    title="Envelope",
    type=OpenAPIType.OBJECT,
    required=["name"],
    properties={
        "name": Schema(
            type=OpenAPIType.STRING,
            pattern=r"\S",
            max_length=MAX_KEY_CHARS,
            description="The event name triggers match, e.g. order.created.",
        ),
        "payload": Schema(
            type=[OpenAPIType.OBJECT, OpenAPIType.NULL],
            description=f"The event's payload; absent or null is {{}}. {_JSON_LIMITS}",
        ),
        "id": Schema(
            type=[OpenAPIType.STRING, OpenAPIType.INTEGER],
            min_length=1,
            max_length=MAX_KEY_CHARS,
            minimum=INT_MIN,
            maximum=INT_MAX,
            description="The event id, unless an Idempotency-Key is sent; without either, a new UUID. Not empty.",
        ),
    },
    description="One event of the events API.",
)

CLOUDEVENT = Schema(
    title="CloudEvent",
    type=OpenAPIType.OBJECT,
    required=["specversion", "id", "source", "type"],
    properties={
        "specversion": Schema(type=OpenAPIType.STRING, min_length=1, examples=["1.0"]),
        "id": _CE_PART,
        "source": _CE_PART,
        "type": Schema(
            type=OpenAPIType.STRING,
            min_length=1,
            max_length=MAX_KEY_CHARS,
            description="The event name triggers match.",
        ),
        "time": Schema(type=OpenAPIType.STRING),
        "subject": Schema(type=OpenAPIType.STRING),
        "datacontenttype": Schema(type=OpenAPIType.STRING),
        "dataschema": Schema(type=OpenAPIType.STRING),
        "data": Schema(
            description=f'The payload; anything but an object is wrapped as {{"data": ...}}. {_JSON_LIMITS}'
        ),
    },
    additional_properties=_CE_EXTENSION,
    description="A CloudEvent in structured mode (CloudEvents JSON format); extension attributes are kept.",
)

_BATCH = "At most http.max_batch_events events (default 1,000); a larger batch is refused whole (413)."

EVENTS_BODY = RequestBody(
    required=True,
    description=(
        "One event or a batch. A CloudEvent in binary mode is sent as its data with ce-* headers "
        "(ce-specversion, ce-id, ce-source, ce-type)."
    ),
    content={
        "application/json": OpenAPIMediaType(
            schema=Schema(
                one_of=[
                    ENVELOPE,
                    Schema(type=OpenAPIType.ARRAY, items=ENVELOPE, title="EnvelopeBatch", description=_BATCH),
                ]
            )
        ),
        CE_STRUCTURED: OpenAPIMediaType(schema=CLOUDEVENT),
        CE_BATCH: OpenAPIMediaType(
            schema=Schema(type=OpenAPIType.ARRAY, items=CLOUDEVENT, title="CloudEventBatch", description=_BATCH)
        ),
    },
)

DELIVERY_BODY = RequestBody(
    required=True,
    description="The provider's delivery, verified over its raw bytes by the webhook's signature scheme.",
    content={
        "application/json": OpenAPIMediaType(schema=Schema(description="Any JSON; an object is the payload.")),
        "application/x-www-form-urlencoded": OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.OBJECT,
                required=["payload"],
                properties={
                    "payload": Schema(
                        type=OpenAPIType.STRING,
                        content_media_type="application/json",
                        description="The delivery's JSON (GitHub's form-encoded deliveries).",
                    )
                },
            )
        ),
    },
)

_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
    required=True,
    description="Seconds to wait before sending the request again.",
)


_ALSO: Mapping[Reason, tuple[Reason, ...]] = {"unavailable": ("overloaded",)}
"""A handler that may answer the key may answer these too: the pipeline's ``Overloaded`` is an
``Unavailable``, caught and answered as one."""


def error_responses(
    reasons: Iterable[Reason], *, or_answer: Mapping[int, Any] | None = None
) -> dict[int, ResponseSpec]:
    """One response per status the ``reasons`` map to, each with the error body's schema.

    ``or_answer`` gives statuses whose body may instead be another answer (a webhook delivery
    answered with its first refused event's status) and that answer's type.
    """
    by_status: dict[int, list[Reason]] = {}
    for reason in [r for given in reasons for r in (given, *_ALSO.get(given, ()))]:
        group = by_status.setdefault(HTTP_STATUS[reason], [])
        if reason not in group:
            group.append(reason)
    specs = {}
    for status, group in sorted(by_status.items()):
        other = (or_answer or {}).get(status)
        specs[status] = ResponseSpec(
            data_container=ErrorBody if other is None else ErrorBody | other,
            description="error: " + ", ".join(group),
            generate_examples=False,
        )
    return specs


@dataclass
class RawBodyOperation(Operation):
    """An operation whose handler reads the raw body: its request body is :attr:`body`, and its
    429 and 503 answers carry ``Retry-After``."""

    body: ClassVar[RequestBody]
    no_auth: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.request_body = self.body
        if self.no_auth:
            self.security = []
        for reason in ("rate_limited", "unavailable"):
            response = (self.responses or {}).get(str(HTTP_STATUS[reason]))
            if isinstance(response, OpenAPIResponse):
                response.headers = {**(response.headers or {}), "Retry-After": _RETRY_AFTER}


_IDEMPOTENCY_KEY = "The event id of an envelope (in a batch: {key}:{index}); a retry with it starts nothing twice."
IDEMPOTENCY_KEY = Parameter(
    name="Idempotency-Key",
    param_in=ParamType.HEADER,
    required=False,
    deprecated=False,
    description=_IDEMPOTENCY_KEY,
    schema=Schema(
        one_of=[Schema(type=OpenAPIType.STRING, max_length=MAX_KEY_CHARS - 8), Schema(type=OpenAPIType.NULL)],
        description=_IDEMPOTENCY_KEY,
    ),
)
"""The events API's one header parameter, written out as litestar would derive it from a handler
parameter: the handler reads it from the headers it reads anyway (see adapters.http.events)."""


@dataclass
class EventsOperation(RawBodyOperation):
    body = EVENTS_BODY

    def __post_init__(self) -> None:
        super().__post_init__()
        self.parameters = [IDEMPOTENCY_KEY, *(self.parameters or [])]


@dataclass
class DeliveryOperation(RawBodyOperation):
    body = DELIVERY_BODY
    no_auth = True


def openapi_config() -> OpenAPIConfig:
    """The document and its pages under ``/schema``, for bearer token holders only (the router's
    guard, :func:`adapters.http.state.needs_token`): docs/operations.md, "Exposure"."""
    return OpenAPIConfig(
        title="signal-bridge",
        version="0.1.0",
        path="/schema",
        openapi_router=Router(
            "/schema", route_handlers=[], include_in_schema=False, opt={NEEDS_TOKEN: True}, guards=[needs_token]
        ),
        use_handler_docstrings=True,
        description="Events and webhook deliveries in, Temporal workflow runs out. Reference: docs/http-api.md.",
        components=Components(
            security_schemes={
                BEARER: SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="One of http.auth.tokens. Webhooks use their signature instead.",
                )
            },
        ),
    )
