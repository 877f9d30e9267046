"""``POST /api/v1/hooks/{slug}``: webhook deliveries, authenticated by their signature, never by a
bearer token.

The checks run in this order: the slug, the body size, the signature over the raw bytes, the
webhook's rate limit, then the body (see :mod:`bridge.webhooks`). A delivery is answered per event
like a batch; one that no ``events:`` entry matches is answered 200, because providers retry
anything but a 2xx. Verification kinds, ids and answers: docs/webhooks.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated, Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import PathParameter

from adapters.http import answers
from adapters.http.answers import ACCEPTED, DeliveryAnswer, Ignored
from adapters.http.openapi import DeliveryOperation, error_responses
from adapters.http.request import headers, read_body
from adapters.http.state import WEBHOOK_ADAPTER, HttpState, Weighed, address_key
from bridge.errors import HTTP_STATUS, EventRejected, Reason
from bridge.logsafe import safe
from bridge.ratelimit import retry_after
from bridge.signatures import SignatureInvalid
from bridge.snapshot import Snapshot
from bridge.webhooks import Delivery, WebhookRoute

log = logging.getLogger(__name__)

REASONS: tuple[Reason, ...] = (
    "malformed",
    "unauthorized",
    "not_found",
    "too_large",
    "too_slow",
    "schema_invalid",
    "unroutable",
    "target_invalid",
    "input_failed",
    "rate_limited",
    "unavailable",
    "overloaded",
)
"""Every reason this endpoint answers with (a test holds it to the code)."""

NOT_VERIFIED = "the delivery's signature did not verify"
UNREADABLE = "the delivery's body could not be read"

EVENT_REASONS: tuple[Reason, ...] = ("too_large", "schema_invalid", "unroutable", "target_invalid")
"""Why the pipeline may refuse one event of a delivery: the delivery is then answered with the
first refused event's status and the per-event answer as its body."""
TRANSIENT = frozenset(HTTP_STATUS[r] for r in ("rate_limited", "unavailable", "overloaded"))
"""Statuses of events refused for a while: a delivery with one is not answered again as it was."""


class WebhooksController(Controller):
    path = "/api/v1/hooks"
    tags = ["webhooks"]

    @post(
        "/{slug:str}",
        status_code=ACCEPTED,
        summary="Receive a webhook delivery",
        operation_id="receiveWebhook",
        operation_class=DeliveryOperation,
        responses={
            200: ResponseSpec(
                Ignored, description="No events: entry of the webhook matches the delivery", generate_examples=False
            ),
            **error_responses(REASONS, or_answer={HTTP_STATUS[r]: DeliveryAnswer for r in EVENT_REASONS}),
        },
    )
    async def receive(
        self,
        slug: Annotated[str, PathParameter(description="The webhook's slug (webhooks[].slug).")],
        request: Request[Any, Any, Any],
        http: NamedDependency[HttpState],
        snapshot: NamedDependency[Snapshot],
    ) -> Response[DeliveryAnswer]:
        """A provider's delivery, authenticated by its signature (``webhooks[].verify``): 202 once
        Temporal holds its events, 200 ``ignored`` when no ``events:`` entry matches. A
        redelivery, or a replay of a captured delivery, starts nothing twice: event ids are
        formed only of what the signature covers."""
        route = snapshot.webhooks.get(slug)
        if route is None:
            log.info("webhook refused slug=%s: no webhook is configured at this path", safe(slug))
            raise http.deny(WEBHOOK_ADAPTER, "not_found", "no webhook is configured at this path")
        # Until its signature is checked a request is anyone's: its share of the requests in flight is
        # its address's. Keyed by the slug, anyone could hold all of a webhook's share with unsigned
        # bodies sent a byte at a time, and the provider's deliveries were refused (429) meanwhile.
        # Nor may requests from a few addresses hold every request the process has: together they
        # have half of them, and when that is full the address holding most gives way (HttpState.unverified).
        address = address_key(request.client.host) if request.client else "-"
        with http.held(WEBHOOK_ADAPTER, f"{WEBHOOK_ADAPTER}-unverified:{address}", what="requests from this address"):
            async with http.unverified(snapshot, address):
                body = await read_body(request, http, snapshot, WEBHOOK_ADAPTER)
            received = headers(request)
            _verify(http, route, received, body)
        with (
            http.held(WEBHOOK_ADAPTER, _sender(slug)),
            http.parsing(snapshot, WEBHOOK_ADAPTER, _sender(slug), body) as weighed,
        ):
            signed, copy = route.keys(received, body, received.get("content-type"))
            if (same := route.answer_to_copy(copy)) is not None:
                status, answer, events = same
                log.info("webhook delivery repeated slug=%s status=%d: the same copy answered as before", slug, status)
                http.metrics.child(http.metrics.received, WEBHOOK_ADAPTER).inc(events)
                return Response(answer, status_code=status)
            repeat, wait = route.repeat(signed, copy, address)
            if wait:
                log.info(
                    "webhook refused slug=%s address=%s: too many copies of a delivery read for nothing",
                    slug,
                    safe(address),
                )
                raise http.deny(
                    WEBHOOK_ADAPTER,
                    "rate_limited",
                    "this delivery was received before, and its copies sent nothing new; "
                    "retry after the Retry-After delay",
                    retry_after=retry_after(wait),
                )
            held: list[str] = []
            try:
                response, held = await self._read(slug, route, received, body, http, snapshot, weighed, copy)
                return response
            finally:  # a counted copy keeps its tokens when it held nothing new (or failed)
                route.held_new(signed, held, repeat)

    async def _read(
        self,
        slug: str,
        route: WebhookRoute,
        received: dict[str, str],
        body: bytes,
        http: HttpState,
        snapshot: Snapshot,
        weighed: Weighed,
        copy: str,
    ) -> tuple[Response[DeliveryAnswer], list[str]]:
        """The delivery's answer, and the ids of the events Temporal holds from this copy: none
        when it is answered as before (its events were sent) or ``200 ignored``, else sent."""
        delivery = _events(http, route, received, body)
        if (kept := route.answer_to(delivery)) is not None:
            status, answer = kept
            log.info(
                "webhook delivery repeated slug=%s delivery=%s status=%d: answered as before, not sent again",
                slug,
                safe(delivery.delivery_id),
                status,
            )
            http.metrics.child(http.metrics.received, WEBHOOK_ADAPTER).inc(len(delivery.events))
            route.remember_copy(delivery.delivery_id, copy)
            return Response(answer, status_code=status), []
        if delivery.limited:
            _limited(http, slug, delivery)
        if not delivery.events:  # sends nothing, so takes nothing of the rate limit (replays included)
            ignored = _ignored(http, slug, delivery)
            route.remember(delivery, ignored.status_code or 200, ignored.content, copy)
            return ignored, []
        ids = Counter(e.id for e in delivery.events)
        sending = route.in_flight.setdefault(delivery.delivery_id, Counter())
        if not ids.keys() - sending.keys():  # every event of it is on its way in another copy
            log.info(
                "webhook delivery repeated slug=%s delivery=%s: the first copy is still being handled",
                slug,
                safe(delivery.delivery_id),
            )
            raise http.deny(
                WEBHOOK_ADAPTER,
                "rate_limited",
                "this delivery is being handled now; retry after the Retry-After delay for its answer",
                retry_after=1,
            )
        sending.update(ids)
        try:
            return await self._send(slug, route, delivery, http, snapshot, weighed, copy)
        finally:
            sending.subtract(ids)
            if not +sending:
                route.in_flight.pop(delivery.delivery_id, None)

    async def _send(
        self,
        slug: str,
        route: WebhookRoute,
        delivery: Delivery,
        http: HttpState,
        snapshot: Snapshot,
        weighed: Weighed,
        copy: str,
    ) -> tuple[Response[DeliveryAnswer], list[str]]:
        """The delivery sent, within the webhook's rate limit; and the ids of the events held."""
        bucket = http.limits().webhooks.get(slug)
        if bucket is not None and (wait := bucket.take()):
            log.info("webhook refused slug=%s: over its rate limit", slug)
            raise http.deny(
                WEBHOOK_ADAPTER,
                "rate_limited",
                "rate limit of this webhook exceeded; retry after the Retry-After delay",
                retry_after=retry_after(wait),
            )
        response = await _submit(http, snapshot, slug, delivery, weighed)
        if response.status_code is not None and _final(response.content):
            route.remember(delivery, response.status_code, response.content, copy)
        return response, [r["event_id"] for r in response.content["results"] if r["status"] == ACCEPTED]


def _final(answer: dict[str, Any]) -> bool:
    """Whether a delivery's answer is one only a reload could change: every event accepted, or
    refused for what it is (a schema, no route: 4xx), none for a while (429, 503)."""
    return all(r["status"] not in TRANSIENT for r in answer["results"])


def _verify(http: HttpState, route: WebhookRoute, received: dict[str, str], body: bytes) -> None:
    """401 unless signed as configured; the answer never says what was wrong, the log does (the
    reason may quote the sender's headers: escaped and cut). A verifier that fails otherwise has
    a bug: logged with its traceback, and the delivery is still not let in."""
    try:
        route.verify(received, body)
    except SignatureInvalid as exc:
        log.warning("webhook refused slug=%s kind=%s: %s", route.slug, route.verifier.kind, safe(str(exc), 500))
        raise http.deny(WEBHOOK_ADAPTER, "unauthorized", NOT_VERIFIED) from None
    except Exception:
        log.exception(
            "webhook refused slug=%s kind=%s: the verifier failed unexpectedly", route.slug, route.verifier.kind
        )
        raise http.deny(WEBHOOK_ADAPTER, "unauthorized", NOT_VERIFIED) from None


def _events(http: HttpState, route: WebhookRoute, received: dict[str, str], body: bytes) -> Delivery:
    """The delivery's events, or ``malformed``/``input_failed`` (logged and counted). A parser
    that fails otherwise has a bug: logged with its traceback and answered as ``malformed``."""
    try:
        return route.events(received, body, received.get("content-type"))
    except EventRejected as exc:
        log.info("webhook refused slug=%s reason=%s", route.slug, exc.reason)
        raise http.refuse(WEBHOOK_ADAPTER, exc) from None
    except Exception:
        log.exception("webhook refused slug=%s: its body could not be read unexpectedly", route.slug)
        raise http.refuse(WEBHOOK_ADAPTER, EventRejected("malformed", UNREADABLE)) from None


def _limited(http: HttpState, slug: str, delivery: Delivery) -> None:
    """Entries whose filter ran out of its budget on this delivery: no match, as in the dispatcher,
    but counted and logged as such (``filter_limited``), not as a delivery no entry wanted."""
    http.metrics.child(http.metrics.dropped, WEBHOOK_ADAPTER, "filter_limited").inc(len(delivery.limited))
    log.warning(
        "webhook filter out of budget slug=%s delivery=%s entries=%s: counted as not matching; "
        "filter on the fields you route by, not over whole lists",
        slug,
        safe(delivery.delivery_id),
        safe(",".join(delivery.limited)),
    )


def _ignored(http: HttpState, slug: str, delivery: Delivery) -> Response[Any]:
    if not delivery.limited:  # else counted as filter_limited
        http.metrics.child(http.metrics.dropped, WEBHOOK_ADAPTER, "no_match").inc()
    log.info(
        "webhook ignored slug=%s delivery=%s provider_delivery=%s: no event entry matches",
        slug,
        safe(delivery.delivery_id),
        safe(delivery.provider_delivery_id),
    )
    body = {
        "status": "ignored",
        "delivery_id": delivery.delivery_id,
        "message": f"no event entry of webhook {slug!r} matches this delivery",
    }
    return Response(body, status_code=200)


def _sender(slug: str) -> str:
    """Whose share a webhook's verified deliveries and their events are counted in."""
    return f"{WEBHOOK_ADAPTER}:{slug}"


async def _submit(http: HttpState, snap: Snapshot, slug: str, delivery: Delivery, weighed: Weighed) -> Response[Any]:
    retry_hint = "Temporal did not accept the delivery; its redelivery will be"
    outcomes = await http.submit(
        snap,
        delivery.events,
        WEBHOOK_ADAPTER,
        retry_hint,
        sender=_sender(slug),
        weighed=weighed,
        delivery_id=delivery.delivery_id,
    )
    answer = answers.batch([answers.result(o) for o in outcomes], delivery_id=delivery.delivery_id)
    log.info(
        "webhook delivery slug=%s delivery=%s provider_delivery=%s accepted=%d rejected=%d",
        slug,
        safe(delivery.delivery_id),
        safe(delivery.provider_delivery_id),
        answer["accepted"],
        answer["rejected"],
    )
    if answer["rejected"]:
        # A refused event is a config matter (no workflow, schema): a non-2xx shows it in the
        # provider's console and makes it retry, which succeeds once the config is fixed; the
        # events already accepted start nothing twice.
        first = next(r for r in answer["results"] if r["status"] != ACCEPTED)
        return Response(answer, status_code=first["status"])
    return Response(answer, status_code=ACCEPTED)
