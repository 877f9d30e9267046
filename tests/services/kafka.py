"""Apache Kafka for the tests: a single KRaft node from the cached jars, or a container."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from bridge.runtime.embedded import free_port
from tests.services import containers
from tests.services.process import LocalProcess, ServiceUnavailable, cache_dir

DEFAULT_KAFKA_VERSION = "4.1.1"


async def probe(bootstrap: str) -> None:
    """A port that accepts TCP is not enough: the broker must be in the cluster metadata."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), timeout=10)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=10)
        if not cluster.get("brokers"):
            raise RuntimeError(f"no brokers in metadata: {cluster}")
    finally:
        await admin.close()


class LocalKafka(LocalProcess):
    """A single-node KRaft Kafka (broker + controller in one JVM) from the cached jars."""

    name = "kafka"
    start_timeout = 120.0

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        controller_port: int | None = None,
    ) -> None:
        self.home = _find_kafka_home()
        self.java = shutil.which("java") or ""
        if not self.java:
            raise ServiceUnavailable("no `java` on PATH (Kafka 4 needs Java 17+)")
        super().__init__(workdir)
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "server.properties"
        self.data_dir = self.workdir / "data"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            self.java, "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", str(self.home / "libs" / "*"), main, *args,
        ]  # fmt: skip

    def _command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_path))

    def _prepare(self) -> None:
        controller = f"127.0.0.1:{self.controller_port}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Kafka 4 formats with --standalone: a dynamic quorum found through bootstrap servers
            # (controller.quorum.voters would describe a static quorum and clash with it).
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50 makes the first consumer-group join seconds faster.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        if (self.data_dir / "meta.properties").exists():
            return
        # As one argument: one id in 64 starts with '-', which a separate argument would make an option.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(self.config_path),
            "--standalone",
        )
        result = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"kafka storage format failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    async def _probe(self) -> None:
        await probe(self.bootstrap)


def _find_kafka_home() -> Path:
    cache = cache_dir()
    wanted = os.environ.get("KAFKA_VERSION")
    candidates = [cache / f"kafka-{wanted}"] if wanted else []
    candidates.append(cache / f"kafka-{DEFAULT_KAFKA_VERSION}")
    candidates.extend(sorted(cache.glob("kafka-*"), reverse=True))
    for home in candidates:
        if (home / "libs" / ".complete").is_file() and (home / "log4j2.properties").is_file():
            return home
    raise ServiceUnavailable(f"no Kafka jars under {cache} (run scripts/install-services.sh)")


def from_container() -> str:
    from testcontainers.kafka import KafkaContainer

    container = containers.start(KafkaContainer().with_kraft())
    bootstrap = str(container.get_bootstrap_server())
    containers.wait_probe("kafka container", lambda: probe(bootstrap), 90)
    return bootstrap


def from_local() -> str:
    return LocalKafka().start().bootstrap
