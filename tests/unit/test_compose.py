"""compose/ agrees with the bridge: env names, ports, addresses, config path, console script, and
the monitoring beside it (Prometheus scrapes the bridge with its token, Grafana reads Prometheus
and loads the dashboard; what the dashboard queries: test_dashboard.py).

No Docker engine is needed: the compose file, the Dockerfile, the config and the monitoring files
are read as data and checked against what the bridge really reads.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bridge.config import BridgeConfig
from bridge.runtime.settings import Settings
from bridge.snapshot import load
from dispatcher import search

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
TOKEN = "compose-test-token"
# What an operator exports before `docker compose up` (docker-compose.yml requires both).
HOST_ENV = {"BRIDGE_TOKEN": TOKEN, "RABBITMQ_PASSWORD": "compose-broker-password"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


COMPOSE = _compose()
SERVICES: dict[str, Any] = COMPOSE["services"]
BRIDGE = SERVICES["bridge"]


def resolve(value: str, host: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` against the host env."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in host:
            return host[name]
        if op == ":-":
            return arg or ""
        raise AssertionError(f"compose needs ${name}: {arg}")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


def environment(service: dict[str, Any], host: dict[str, str] = HOST_ENV) -> dict[str, str]:
    """The service's environment as its container sees it, given the host's variables."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: resolve(str(v), host) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service declares: ``expose`` and the container side of ``ports``."""
    out = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port → host port."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out[int(p["target"])] = int(p["published"])
        else:
            parts = str(p).split("/")[0].split(":")
            out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (COMPOSE_DIR / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(instruction: str) -> list[str]:
    values = [rest for word, rest in dockerfile() if word == instruction]
    if not values:
        return []
    value = values[-1]
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def command_line() -> list[str]:
    """What the bridge container runs: compose's entrypoint/command, else the Dockerfile's."""
    entry = BRIDGE.get("entrypoint") or exec_form("ENTRYPOINT")
    cmd = BRIDGE.get("command") or exec_form("CMD")
    return [*entry, *cmd]


def config_path() -> str:
    args = command_line()
    if "--config" in args:
        return args[args.index("--config") + 1]
    return environment(BRIDGE)["SIGNAL_BRIDGE_CONFIG"]


def effective_config() -> BridgeConfig:
    """compose/config.yaml as the container sees it: loaded, then SIGNAL_BRIDGE_* applied."""
    env = environment(BRIDGE)
    cfg = load(COMPOSE_DIR / "config.yaml", env=env).config
    return Settings.from_env(env).apply(cfg)


class _Recording(dict[str, str]):
    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def settings_env_names() -> set[str]:
    env = _Recording()
    Settings.from_env(env)
    return env.read


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of the service's bind mounts (relative to compose/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        out[target] = (COMPOSE_DIR / source).resolve()
    return out


def host_path(service: dict[str, Any], path: str) -> Path:
    """The file on the host that ``path`` is inside the service's container."""
    for target, source in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target) :].lstrip("/")
    raise AssertionError(f"nothing is mounted at {path}")


def secret_files(service: dict[str, Any]) -> dict[str, str]:
    """Container path → name of each top-level secret the service is granted."""
    out = {}
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        target = name if isinstance(secret, str) else secret.get("target", name)
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = name
    return out


PROMETHEUS = SERVICES["prometheus"]
GRAFANA = SERVICES["grafana"]
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"  # where the image's default command reads it
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"  # the image's GF_PATHS_PROVISIONING


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(host_path(PROMETHEUS, PROMETHEUS_CONFIG).read_text())


def scrape_job() -> dict[str, Any]:
    [job] = prometheus_config()["scrape_configs"]
    return job


def scrape_token(host: dict[str, str] = HOST_ENV) -> str:
    """The bearer token Prometheus sends: its credentials file is a compose secret, read from the
    host's environment."""
    path = scrape_job()["authorization"]["credentials_file"]
    granted = secret_files(PROMETHEUS)
    assert path in granted, f"{path} is no secret the prometheus service is granted"
    variable = COMPOSE["secrets"][granted[path]]["environment"]
    return host[variable]


def grafana_provisioning(kind: str) -> list[dict[str, Any]]:
    """Every provisioning file of one kind (``datasources``, ``dashboards``) Grafana reads."""
    folder = host_path(GRAFANA, f"{GRAFANA_PROVISIONING}/{kind}")
    files = sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    assert files, f"no {kind} provisioning in {folder}"
    return [yaml.safe_load(f.read_text()) for f in files]


def grafana_datasources() -> list[dict[str, Any]]:
    return [ds for doc in grafana_provisioning("datasources") for ds in doc["datasources"]]


def dashboard_files() -> list[Path]:
    """The dashboard JSON files Grafana's file providers load."""
    out = []
    for doc in grafana_provisioning("dashboards"):
        for provider in doc["providers"]:
            assert provider["type"] == "file"
            out += sorted(host_path(GRAFANA, provider["options"]["path"]).glob("*.json"))
    return out


# --- the services --------------------------------------------------------------------------


def test_stack_has_its_services_with_healthchecks() -> None:
    for name in ("temporal", "kafka", "rabbitmq", "bridge", "prometheus"):
        assert name in SERVICES
        assert SERVICES[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_bridge_waits_for_its_services() -> None:
    deps = BRIDGE["depends_on"]
    assert deps["temporal"]["condition"] == "service_healthy"
    assert deps["rabbitmq"]["condition"] == "service_healthy"
    kafka_dep = deps.get("kafka") or deps["kafka-init"]
    assert kafka_dep["condition"] in ("service_healthy", "service_completed_successfully")


def test_kafka_runs_in_kraft_mode() -> None:
    env = environment(SERVICES["kafka"])
    assert SERVICES["kafka"]["image"].startswith("apache/kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env)


def test_temporal_dev_server_listens_beyond_loopback() -> None:
    cmd = SERVICES["temporal"]["command"]
    cmd = cmd if isinstance(cmd, list) else shlex.split(cmd)
    assert cmd[:2] == ["server", "start-dev"]
    assert cmd[cmd.index("--ip") + 1] == "0.0.0.0"


# --- the bridge's settings -----------------------------------------------------------------


def test_recording_sees_settings_names() -> None:
    """The probe below is only as good as this: it must see what from_env reads."""
    names = settings_env_names()
    assert {"SIGNAL_BRIDGE_HTTP_PORT", "SIGNAL_BRIDGE_TEMPORAL_ADDRESS"} <= names


def test_every_signal_bridge_env_name_is_read_by_the_bridge() -> None:
    used = {k for k in environment(BRIDGE) if k.startswith("SIGNAL_BRIDGE_")}
    used |= {
        m.group(1)
        for word, rest in dockerfile()
        if word == "ENV"
        for m in re.finditer(r"(SIGNAL_BRIDGE_[A-Z_]+)", rest)
    }
    assert used, "compose sets no SIGNAL_BRIDGE_* variables"
    unknown = used - settings_env_names()
    assert not unknown, f"the bridge never reads {sorted(unknown)}"


def test_bridge_listens_on_all_interfaces() -> None:
    assert effective_config().http.host == "0.0.0.0"


def test_published_port_is_the_configured_http_port() -> None:
    port = effective_config().http.port
    assert port == 8080
    assert published_ports(BRIDGE) == {port: port}
    exposed = {int(p) for word, rest in dockerfile() if word == "EXPOSE" for p in rest.split()}
    assert port in exposed


def test_healthcheck_probes_readyz_on_the_http_port() -> None:
    test = " ".join(BRIDGE["healthcheck"]["test"])
    assert f"127.0.0.1:{effective_config().http.port}/readyz" in test


# --- the config ----------------------------------------------------------------------------


def test_config_loads_and_takes_its_token_from_the_environment() -> None:
    cfg = effective_config()
    assert cfg.http.auth.tokens == [TOKEN]
    assert "BRIDGE_TOKEN" in environment(BRIDGE)


def test_config_is_mounted_where_the_bridge_reads_it() -> None:
    path = config_path()
    assert environment(BRIDGE).get("SIGNAL_BRIDGE_CONFIG", path) == path
    mounts = {}
    for volume in BRIDGE["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    assert (COMPOSE_DIR / mounts[path]).resolve() == (COMPOSE_DIR / "config.yaml").resolve()


def test_temporal_address_points_at_the_temporal_service() -> None:
    raw = load(COMPOSE_DIR / "config.yaml", env=environment(BRIDGE)).config
    for address in (effective_config().temporal.address, raw.temporal.address):
        host, port = host_port(address or "")
        assert host in SERVICES
        assert port in container_ports(SERVICES[host])


def test_kafka_consumer_points_at_the_advertised_kafka_listener() -> None:
    [consumer] = effective_config().kafka
    for server in consumer.bootstrap_servers.split(","):
        host, port = host_port(server)
        assert host in SERVICES
        assert port in container_ports(SERVICES[host])
        assert f"//{host}:{port}" in environment(SERVICES[host])["KAFKA_ADVERTISED_LISTENERS"]


def test_kafka_topics_are_created() -> None:
    [consumer] = effective_config().kafka
    init = " ".join(SERVICES["kafka-init"]["command"])
    for topic in [*consumer.topics, consumer.dead_letter_topic]:
        assert topic and re.search(rf"(^|\s){re.escape(topic)}(\s|;|$)", init), f"topic {topic} not created"


def test_amqp_consumer_points_at_the_rabbitmq_service() -> None:
    [consumer] = effective_config().amqp
    url = urlsplit(consumer.url)
    assert url.hostname in SERVICES
    rabbit = SERVICES[url.hostname]
    assert (url.port or 5672) in container_ports(rabbit)
    env = environment(rabbit)
    assert (url.username, url.password) == (env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"])


def test_no_default_broker_account() -> None:
    env = environment(SERVICES["rabbitmq"])
    assert (env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]) != ("guest", "guest")
    assert env["RABBITMQ_DEFAULT_PASS"] == HOST_ENV["RABBITMQ_PASSWORD"]
    with pytest.raises(AssertionError, match="RABBITMQ_PASSWORD"):
        environment(SERVICES["rabbitmq"], host={"BRIDGE_TOKEN": TOKEN})  # compose refuses to start


def test_only_the_bridge_is_published_beyond_loopback() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            spec = str(port) if not isinstance(port, dict) else f"{port.get('host_ip', '')}:{port['published']}"
            if name == "bridge":
                continue
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec} on every interface"


def test_config_runs_the_example_workflows() -> None:
    example = yaml.safe_load((ROOT / "examples" / "shop.yaml").read_text())
    ours = yaml.safe_load((COMPOSE_DIR / "config.yaml").read_text())
    assert ours["workflows"] == example["workflows"]


# --- the image -----------------------------------------------------------------------------


def test_image_runs_the_declared_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    args = command_line()
    assert args[0] == "signal-bridge"
    assert args[0] in scripts
    assert args[1] == "serve"


def test_image_is_python_311_slim_and_installs_the_project() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs)


@pytest.mark.parametrize("source", ["pyproject.toml", "README.md", "bridge", "adapters", "dispatcher"])
def test_image_copies_what_pip_install_needs(source: str) -> None:
    """``pyproject.toml`` names README.md as the readme: the build fails without it."""
    copied = {
        part
        for word, rest in dockerfile()
        if word == "COPY"
        for part in shlex.split(rest)[:-1]
        if not part.startswith("--")
    }
    assert source in copied
    assert (ROOT / source).exists(), f"{source} is copied into the image but missing from the repository"
    ignore = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    assert f"!{source}" in ignore, f"{source} is excluded from the build context"


# --- monitoring: Prometheus and Grafana ----------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_images_are_pinned(name: str) -> None:
    image = SERVICES[name]["image"]
    repository, _, tag = image.rpartition(":")
    assert repository in ("prom/prometheus", "grafana/grafana"), f"{name}: not the official image"
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"


def test_prometheus_reads_the_mounted_config() -> None:
    assert "command" not in PROMETHEUS and "entrypoint" not in PROMETHEUS  # the image's --config.file
    assert host_path(PROMETHEUS, PROMETHEUS_CONFIG) == (COMPOSE_DIR / "prometheus" / "prometheus.yml").resolve()


def test_prometheus_scrapes_the_bridge_metrics_endpoint() -> None:
    job = scrape_job()
    assert job.get("scheme", "http") == "http"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [static] = job["static_configs"]
    [target] = static["targets"]
    host, port = host_port(target)
    assert SERVICES.get(host) is BRIDGE, f"{target} is not the bridge service"
    assert port == effective_config().http.port
    assert port in container_ports(BRIDGE)


def test_prometheus_sends_the_token_the_bridge_takes() -> None:
    """The token comes from the host's $BRIDGE_TOKEN, as the bridge's does, and is in no file."""
    auth = scrape_job()["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    assert "credentials" not in auth
    assert scrape_token() == TOKEN
    assert scrape_token() in effective_config().http.auth.tokens
    changed = {**HOST_ENV, "BRIDGE_TOKEN": "another-token"}
    assert scrape_token(changed) == environment(BRIDGE, changed)["BRIDGE_TOKEN"]


def test_prometheus_and_grafana_datasource_agree_on_the_scrape_interval() -> None:
    """Grafana's $__rate_interval is only right when it knows the scrape interval."""
    interval = scrape_job().get("scrape_interval") or prometheus_config()["global"]["scrape_interval"]
    [source] = grafana_datasources()
    assert source["jsonData"]["timeInterval"] == interval


def test_grafana_reads_the_prometheus_service() -> None:
    [source] = grafana_datasources()
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname in SERVICES and SERVICES[url.hostname] is PROMETHEUS
    assert url.port in container_ports(PROMETHEUS)
    assert GRAFANA["depends_on"]["prometheus"]


def test_grafana_provisions_the_dashboard() -> None:
    dashboard = (COMPOSE_DIR / "grafana" / "dashboards" / "signal-bridge.json").resolve()
    assert dashboard_files() == [dashboard]
    home = environment(GRAFANA)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(GRAFANA, home) == dashboard


def test_grafana_shows_dashboards_without_an_account() -> None:
    """No admin/admin: anonymous viewers only, and no login a default password would open."""
    env = environment(GRAFANA)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert env["GF_AUTH_BASIC_ENABLED"] == "false"


def test_temporal_registers_the_search_attributes_target_runs_carry() -> None:
    """Without them the bridge logs an ERROR at start, starts runs unsearchable, and `events list`
    (which asks by SignalBridgeProject) finds nothing."""
    cmd = SERVICES["temporal"]["command"]
    flags = search.dev_server_flags()
    pairs = list(zip(flags[::2], flags[1::2], strict=True))
    assert all(any(cmd[i : i + 2] == list(pair) for i in range(len(cmd))) for pair in pairs), cmd


def test_the_amqp_dead_letter_exchange_has_a_queue_before_the_bridge_starts() -> None:
    """A dead letter that reaches no queue is dropped: every poison message sent to the stack was
    lost, with nothing to replay."""
    [consumer] = effective_config().amqp
    init = SERVICES["rabbitmq-init"]
    script = init["command"][0]
    compile(script, "rabbitmq-init", "exec")  # it runs as python -c
    assert init["entrypoint"] == ["python", "-c"] and init["image"] == BRIDGE["image"]
    assert f'declare_exchange("{consumer.dead_letter_exchange}", aio_pika.ExchangeType.FANOUT, durable=True)' in script
    assert re.search(r'declare_queue\("[\w.]+", durable=True\)', script) and "await queue.bind(exchange)" in script
    assert BRIDGE["depends_on"]["rabbitmq-init"]["condition"] == "service_completed_successfully"
    assert init["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    env = environment(init)
    assert (env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"]) == (
        environment(SERVICES["rabbitmq"])["RABBITMQ_DEFAULT_USER"],
        environment(SERVICES["rabbitmq"])["RABBITMQ_DEFAULT_PASS"],
    )
