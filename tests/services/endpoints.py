"""One endpoint per service and process: from the environment, else a container, else a local server."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from tests.services import containers, kafka, rabbitmq, temporal
from tests.services.process import ServiceUnavailable

logger = logging.getLogger(__name__)

_session: dict[str, str | ServiceUnavailable] = {}
_session_lock = threading.Lock()


def _resolve(kind: str, env_var: str, from_container: Callable[[], str], from_local: Callable[[], str]) -> str:
    """Resolve one endpoint once per process; a failure is remembered so it is not retried per test."""
    with _session_lock:
        cached = _session.get(kind)
        if cached is None:
            cached = _session[kind] = _provide(kind, env_var, from_container, from_local)
    if isinstance(cached, ServiceUnavailable):
        raise cached
    return cached


def _provide(
    kind: str, env_var: str, from_container: Callable[[], str], from_local: Callable[[], str]
) -> str | ServiceUnavailable:
    value = os.environ.get(env_var)
    if value:
        logger.info("%s from $%s: %s", kind, env_var, value)
        return value
    try:
        if containers.docker_available():
            logger.info("starting %s in a container", kind)
            return from_container()
        logger.info("starting a local %s", kind)
        return from_local()
    except ServiceUnavailable as exc:
        logger.warning("%s unavailable: %s", kind, exc)
        return exc
    except Exception as exc:
        logger.warning("%s unavailable", kind, exc_info=True)
        return ServiceUnavailable(f"{kind}: {exc!r}")


def temporal_address() -> str:
    """host:port of a Temporal frontend with the `default` namespace."""
    return _resolve("temporal", "TEMPORAL_ADDRESS", temporal.from_container, temporal.from_local)


def kafka_bootstrap() -> str:
    """Kafka bootstrap servers (auto topic creation on, 3 partitions by default)."""
    return _resolve("kafka", "KAFKA_BOOTSTRAP_SERVERS", kafka.from_container, kafka.from_local)


def amqp_url() -> str:
    """amqp:// URL of a RabbitMQ broker where guest/guest may connect."""
    return _resolve("rabbitmq", "AMQP_URL", rabbitmq.from_container, rabbitmq.from_local)


# Service name → the environment variable that carries its endpoint, and how to get one.
ENDPOINTS: dict[str, tuple[str, Callable[[], str]]] = {
    "temporal": ("TEMPORAL_ADDRESS", temporal_address),
    "kafka": ("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap),
    "amqp": ("AMQP_URL", amqp_url),
}
