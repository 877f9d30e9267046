"""Settings from the environment (``SIGNAL_BRIDGE_*``), read in this one place only.

They override the config file, so containers can set ports and addresses without editing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bridge.config import BridgeConfig


@dataclass
class Settings:
    config: str = "signal-bridge.yaml"
    http_host: str | None = None
    http_port: int | None = None
    temporal_address: str | None = None
    temporal_namespace: str | None = None
    insecure: bool = False
    data_dir: str = ".signal-bridge"
    log_level: str = "INFO"
    log_format: str = "text"
    url: str = "http://127.0.0.1:8080"
    token: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        port = e.get("SIGNAL_BRIDGE_HTTP_PORT")
        return cls(
            config=e.get("SIGNAL_BRIDGE_CONFIG", cls.config),
            http_host=e.get("SIGNAL_BRIDGE_HTTP_HOST"),
            http_port=int(port) if port else None,
            temporal_address=e.get("SIGNAL_BRIDGE_TEMPORAL_ADDRESS"),
            temporal_namespace=e.get("SIGNAL_BRIDGE_TEMPORAL_NAMESPACE"),
            insecure=e.get("SIGNAL_BRIDGE_INSECURE", "").lower() in ("1", "true", "yes"),
            data_dir=e.get("SIGNAL_BRIDGE_DATA_DIR", cls.data_dir),
            log_level=e.get("SIGNAL_BRIDGE_LOG_LEVEL", cls.log_level),
            log_format=e.get("SIGNAL_BRIDGE_LOG_FORMAT", cls.log_format).strip().lower() or cls.log_format,
            url=e.get("SIGNAL_BRIDGE_URL", cls.url),
            token=e.get("SIGNAL_BRIDGE_TOKEN"),
        )

    def apply(self, config: BridgeConfig) -> BridgeConfig:
        """A copy of ``config`` with the environment's overrides (configs are immutable)."""
        http: dict[str, object] = {}
        if self.http_host:
            http["host"] = self.http_host
        if self.http_port is not None:
            http["port"] = self.http_port
        temporal: dict[str, object] = {}
        if self.temporal_address:
            temporal["address"] = self.temporal_address
        if self.temporal_namespace:
            temporal["namespace"] = self.temporal_namespace
        return config.model_copy(
            update={
                "http": config.http.model_copy(update=http),
                "temporal": config.temporal.model_copy(update=temporal),
            }
        )
