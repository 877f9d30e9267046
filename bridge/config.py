"""The configuration file's structure: pydantic models that refuse unknown keys, and the reader.

:func:`read_config` checks structure (YAML, ``${VAR}`` interpolation, types, unknown keys) and
names the file, workflow and trigger of every error. What the values mean (schemas, filters,
templates, webhook secrets) is compiled once, into a :class:`bridge.snapshot.Snapshot`.
The reference is docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from slugify import slugify

from bridge.config_errors import describe
from bridge.deadletter import dropped_by_replay
from bridge.envvars import interpolate_config
from bridge.errors import ConfigError
from bridge.hosts import parse_host
from bridge.locator import BodyLocatorField, LocatorField

TRIGGER_TYPES = ("signal",)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Trigger(Model):
    type: str = "signal"
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    filter: str | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TRIGGER_TYPES:
            raise ValueError(f"unsupported trigger type {value!r} (supported: {', '.join(TRIGGER_TYPES)})")
        return value

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("trigger name is required")
        return value


class TemplateTaskConfig(Model):
    template: Any


class HttpTaskConfig(Model):
    """``url``, ``method``, ``headers`` and ``body`` keep their ``${VAR}`` references (see
    :mod:`bridge.envvars`); ``timeout_seconds`` may only lower ``runner.timeout_seconds``."""

    url: str
    method: str = "POST"
    headers: dict[str, Any] = Field(default_factory=dict)
    body: Any = None
    timeout_seconds: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=5, ge=1)


class TemplateTask(Model):
    """A runner step that renders ``config.template``; its output is the rendered value."""

    id: str
    type: Literal["template"] = "template"
    config: TemplateTaskConfig


class HttpTask(Model):
    """A runner step that calls ``config.url`` from an activity, with Temporal's retries."""

    id: str
    type: Literal["http"] = "http"
    config: HttpTaskConfig


def _task_kind(value: Any) -> str | None:
    """``type`` when given; else ``http`` when the config has a ``url`` (the seed's task shape)."""
    if isinstance(value, TemplateTask | HttpTask):
        return value.type
    if not isinstance(value, dict):
        return None
    if value.get("type"):
        return str(value["type"])
    config = value.get("config")
    return "http" if isinstance(config, dict) and "url" in config else "template"


Task = Annotated[
    Annotated[TemplateTask, Tag("template")] | Annotated[HttpTask, Tag("http")],
    Discriminator(_task_kind, custom_error_type="task_type", custom_error_message="type is template or http"),
]


class SignalDelivery(Model):
    """Deliver the entry's events to an open run as a signal, instead of starting a run each."""

    name: str = Field(min_length=1)  # the signal the run receives
    workflow_id: str = Field(min_length=1)  # which run: a template rendered against the event, like input
    if_missing: Literal["skip", "start"] = "skip"  # no open run: drop and count, or signal-with-start


class Workflow(Model):
    id: str
    description: str | None = None
    workflow_type: str | None = None
    task_queue: str | None = None
    input: Any = None
    signal: SignalDelivery | None = None
    triggers: list[Trigger] = Field(default_factory=list)
    tasks: list[Task] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> Workflow:
        if self.workflow_type and self.tasks:
            raise ValueError("give either workflow_type (your own workflow) or tasks, not both")
        if not self.workflow_type and not self.tasks:
            raise ValueError("give workflow_type (your own workflow) or tasks (the built-in runner)")
        if self.signal is not None and not self.workflow_type:
            raise ValueError("signal: needs workflow_type, your workflow that handles the signal")
        return self


class TemporalConfig(Model):
    address: str | None = None
    namespace: str = "default"
    api_key: str | None = None
    # None: TLS when an api_key is set (Temporal Cloud), as the SDK does; given False, an API key
    # went over plaintext and the connection failed.
    tls: bool | None = None
    ui: bool = True
    ui_port: int | None = None
    ui_url: str | None = None  # the Temporal UI's address, for links in event look-ups
    db_filename: str | None = None


HISTORY_EVENTS_ACTIVITY = 500
"""``history_events_threshold`` when none is given, in activity mode."""
HISTORY_EVENTS_CHILD = 4096
"""``history_events_threshold`` when none is given, in child mode."""


class DispatcherConfig(Model):
    shards: int = Field(default=1, ge=1, le=256)
    # activity: START_TARGETS activities start each batch with the client (same ids and dedupe; the
    # memo names the event and the dispatcher), at the direct-start ceiling. child: targets are
    # child workflows, linked to the dispatcher in the UI, each start and completion an event in
    # its history: a fraction of the throughput (docs/benchmarks.md).
    start_mode: Literal["child", "activity"] = "activity"
    batch_size: int = Field(default=200, ge=1, le=1000)
    # Batches being started at once; each holds its events' ordering keys, so a later event with
    # the same key waits for it: per-key order holds whatever the depth.
    batches_in_flight: int = Field(default=4, ge=1, le=32)
    # Starts and signals one worker process has waiting on Temporal at once, whatever the batches.
    # Beyond what the server needs to be busy they only queue there, ahead of the events that
    # adapters hand over (docs/benchmarks.md).
    starts_in_flight: int = Field(default=64, ge=1, le=1000)
    # Within starts_in_flight, the starts follow their own latency (dispatcher.slots.StartWindow):
    # more in flight while a round of them answers within this many times the fastest recent
    # start, fewer when slower. None: always starts_in_flight.
    start_latency_tolerance: float | None = Field(default=4.0, ge=1.5, le=1000)
    # While the adapters of the same process hand a burst over slowly, its starts give way
    # (dispatcher.slots): the 202s and broker acks come first. Slow: longer than this per signal;
    # None: more than twice the fastest recent signal.
    handover_target_ms: int | None = Field(default=None, ge=1, le=60_000)
    # Continue-as-new at this history length. Under load its last task is overtaken by a signal
    # and the run is replayed while starts and signals wait: short runs keep that short (500). A
    # child-mode run spends about four history events per target and waits for every child start
    # before it continues: 4096 there. Given: the same for both (docs/benchmarks.md).
    history_events_threshold: int = Field(default=HISTORY_EVENTS_ACTIVITY, ge=100, le=40_000)
    signals_per_run: int = Field(default=5000, ge=10, le=9000)
    children_per_run: int = Field(default=1000, ge=10, le=1800)
    recent_ids: int = Field(default=2000, ge=0, le=20_000)
    # Events that may wait in one process for a signal to the dispatcher; beyond it HTTP answers
    # 503 overloaded and queue adapters stop fetching, so memory stays bounded while Temporal stalls.
    max_pending_events: int = Field(default=10_000, ge=1)
    # Of them, events of one sender (a bearer token, a webhook, a Kafka subscription, a queue):
    # one token's large batches while Temporal is slow must not fill what every source shares.
    # None: a quarter of max_pending_events.
    max_pending_per_source: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _history_default(cls, data: Any) -> Any:
        """Child mode's own default, when no threshold is given."""
        if not isinstance(data, dict) or data.get("start_mode") != "child":
            return data
        if data.get("history_events_threshold") is None:
            return {**data, "history_events_threshold": HISTORY_EVENTS_CHILD}
        return data


class RunnerConfig(Model):
    """The task runner's HTTP calls: which hosts, how long, how much of an answer (docs/configuration.md)."""

    allow_hosts: list[str] | None = None  # None: any host whose addresses are all public
    max_response_bytes: int = Field(default=1024 * 1024, ge=1)
    timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is not None and not hosts:
            raise ValueError("allow_hosts is empty: list the hosts, or leave it out to allow any public address")
        for entry in hosts or []:
            parse_host(entry)
        return hosts

    @property
    def allowed(self) -> list[tuple[str, int | None]] | None:
        return None if self.allow_hosts is None else [parse_host(h) for h in self.allow_hosts]


class NamedToken(Model):
    """A bearer token with a name of its own: the name scopes its event ids and keys its rate limit,
    so reordering or adding tokens changes nothing for the others."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    token: str


PLAIN_TOKEN_NAME = "token-1"
"""The name of the one plain (unnamed) token a config may have."""


_BEARER = re.compile(r"[!-~](?:[ \t!-~]*[!-~])?")
"""A bearer token the bridge can match: ASCII, visible at both ends (the header's are stripped)."""


class HttpAuth(Model):
    """``tokens``: ``{name, token}``, and at most one plain string, first (named ``token-1``).

    The name is the client: it scopes the events sent with the token (their ids, their look-ups)
    and keys its rate limit. Several tokens may share one, to rotate a client's token without a
    new scope. Plain tokens were named by their place in the list, so removing one (a leaked
    token revoked) gave the next one its name: another client's scope, its events and look-ups."""

    tokens: list[str | NamedToken] = Field(default_factory=list)

    @field_validator("tokens")
    @classmethod
    def _usable(cls, tokens: list[str | NamedToken]) -> list[str | NamedToken]:
        # An empty token (as from an unset ${VAR:-}) would count as "configured" and match nothing.
        if any(not (t if isinstance(t, str) else t.token).strip() for t in tokens):
            raise ValueError("a bearer token is empty (is the ${VAR} it comes from set?)")
        # What a client can send in a header and the bridge compares: ASCII, nothing around it. One
        # read from a file with its newline (a Kubernetes secret) matched no request.
        for i, t in enumerate(tokens):
            if not _BEARER.fullmatch(t if isinstance(t, str) else t.token):
                raise ValueError(
                    f"bearer token {i + 1} begins or ends with a space or a line break, or holds a control character "
                    "or a character past ASCII (a newline at the end of the file it was read from?): no request "
                    "could match it"
                )
        plain = [i for i, t in enumerate(tokens) if isinstance(t, str)]
        if len(plain) > 1 or any(i > 0 for i in plain):
            raise ValueError(
                "give each bearer token a name when there are several ({name: ci, token: ...}); a plain one may "
                "only come first. The name scopes the token's events, and a plain token's was its place in the "
                "list, which changed as others were added or removed. To keep the scopes the tokens had, name "
                "them as they were named: token-1, token-2... in the order they were"
            )
        if plain and any(not isinstance(t, str) and t.name == PLAIN_TOKEN_NAME for t in tokens):
            raise ValueError(
                f"a token named {PLAIN_TOKEN_NAME!r} beside a plain token would make them one client: name the "
                f"plain one {PLAIN_TOKEN_NAME!r} too if they are (to rotate its token), or give the other another name"
            )
        return tokens

    @staticmethod
    def named(tokens: list[str | NamedToken]) -> list[tuple[str, str]]:
        return [(PLAIN_TOKEN_NAME, t) if isinstance(t, str) else (t.name, t.token) for t in tokens]

    @property
    def by_name(self) -> list[tuple[str, str]]:
        """(name, token) for every configured token."""
        return self.named(self.tokens)


class RateLimit(Model):
    """A token bucket: ``rate`` events a second on average, bursts of ``burst`` (default: one
    second's worth). Counted per process; a batch of N events costs N."""

    rate: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)


class HttpRateLimit(Model):
    per_token: RateLimit | None = None  # each bearer token on POST /api/v1/events
    per_webhook: RateLimit | None = None  # each webhook slug, unless the webhook sets its own


class HttpConfig(Model):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1)
    # The longest a request's body may take to arrive: a sender that trickles it (or stops) holds
    # a connection and a buffer, with no token needed on a webhook's path. Slower: 408 too_slow.
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Requests handled at once; past it uvicorn answers 503 at once (limit_concurrency).
    max_concurrent_requests: int = Field(default=1000, ge=1)
    # Of them, requests of one source at once (a bearer token; a webhook's slug): past it 429 with
    # Retry-After 1, before the body is read, so one sender cannot take every request the process has.
    max_requests_per_source: int = Field(default=250, ge=1)
    # The memory the requests in flight may hold once parsed: each body weighed before it is parsed
    # (bridge.decode.parsed_weight; a 1 MiB body of `[[],[],…]` parses to 21 MiB), and its charge
    # raised as its events are encoded (encoded_weight). Past it 503 overloaded; past a quarter
    # for one sender (a token, a webhook) when that leaves the others less than a quarter, 429.
    # One request alone always goes.
    max_parsed_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    retry_after_seconds: int = Field(default=5, ge=1)
    # Addresses and networks of the proxies whose X-Forwarded-For names the client: behind a load
    # balancer every request came from its address, and the share of unsigned webhook requests one
    # address may hold in flight was everyone's, so anyone could hold the providers' deliveries out.
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    auth: HttpAuth = Field(default_factory=HttpAuth)
    rate_limit: HttpRateLimit = Field(default_factory=HttpRateLimit)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy)  # strict, as uvicorn reads it: 10.1.2.3/8 would trust no one
            except ValueError:
                raise ValueError(
                    f"{proxy!r} is no IP address or network (10.0.0.0/8: no host bits set; a proxy is trusted "
                    "by its address, never '*')"
                ) from None
        return proxies


class EventFormat(Model):
    """How a queue message becomes an event: its body format and where its name comes from."""

    format: Literal["envelope", "cloudevents", "raw"] = "envelope"
    name: str | None = None
    name_from: LocatorField | None = None
    id_from: LocatorField | None = None
    # The ordering key: events with one key start in order (and land on one dispatcher shard).
    # None: the transport's own, the Kafka record key; RabbitMQ has none by default, since a
    # routing key names a kind of event, and ordering every event of a kind would start them one
    # at a time (docs/rabbitmq.md#delivery-guarantees).
    key_from: LocatorField | None = None

    @model_validator(mode="after")
    def _no_dead_letter_header(self) -> EventFormat:
        """A dead letter carries headers of the bridge's own (``x-original-*``, ``x-dead-letter-*``),
        and a replay drops them to rebuild the message: an event read from one of those names
        would get another id, name or key when replayed (and start again)."""
        for field, locator in (("name_from", self.name_from), ("id_from", self.id_from), ("key_from", self.key_from)):
            if locator is not None and locator.kind == "header" and dropped_by_replay(locator.name):
                raise ValueError(
                    f"{field}: header {locator.name!r} is one the bridge writes on its dead letters and a "
                    "replay drops; read the event from another header"
                )
        return self


class KafkaSecurity(Model):
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL_"):
            mechanisms = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
            if (self.sasl_mechanism or "PLAIN") not in mechanisms:
                raise ValueError(f"sasl_mechanism {self.sasl_mechanism!r}: use one of {', '.join(mechanisms)}")
            if not (self.username and self.password):
                raise ValueError(f"protocol {self.protocol} needs username and password")
        return self


class KafkaConsumer(Model):
    bootstrap_servers: str
    topics: list[str] = Field(min_length=1)
    group_id: str | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    event: EventFormat = Field(default_factory=EventFormat)
    dead_letter_topic: str | None = None
    on_unroutable: Literal["dead_letter", "skip"] = "dead_letter"
    max_batch: int = Field(default=500, ge=1)
    # How often the consumer re-reads the cluster's metadata: a topic created after the start is
    # read within about this long, plus a rebalance (docs/kafka.md).
    metadata_refresh_seconds: int = Field(default=10, ge=1, le=300)
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)


class AmqpBinding(Model):
    exchange: str
    exchange_type: Literal["direct", "fanout", "topic", "headers"] = "topic"
    routing_key: str = "#"


class AmqpConsumer(Model):
    url: str
    queue: str
    bindings: list[AmqpBinding] = Field(default_factory=list)
    prefetch: int = Field(default=200, ge=1, le=65535)
    event: EventFormat = Field(default_factory=lambda: EventFormat(format="envelope"))
    dead_letter_exchange: str | None = None
    on_unroutable: Literal["dead_letter", "skip"] = "dead_letter"


class WebhookVerify(Model):
    """How a delivery proves it came from the provider. ``kind: none`` must be written out.

    ``secrets`` lists every secret accepted at once (rotation); ``secret`` is one more; empty
    values are dropped.
    ``tolerance_seconds`` bounds the signed timestamp's age (stripe, standard-webhooks).
    ``header``, ``algorithm``, ``encoding`` and ``prefix`` shape the generic ``hmac`` kind.
    """

    kind: Literal["none", "hmac", "github", "stripe", "standard-webhooks"]
    secret: str | None = None
    secrets: list[str] = Field(default_factory=list)
    tolerance_seconds: int = Field(default=300, ge=1)
    header: str | None = None
    algorithm: Literal["sha256", "sha1", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""

    @model_validator(mode="after")
    def _has_secret(self) -> WebhookVerify:
        if self.kind == "none" and self.all_secrets:
            raise ValueError("verify kind 'none' checks no signature; remove secret/secrets or choose a kind")
        if self.kind != "none" and not self.all_secrets:
            raise ValueError(f"verify kind {self.kind!r} needs a non-empty secret or secrets")
        if self.kind != "hmac" and (self.header or self.prefix):
            raise ValueError("header and prefix apply to verify kind 'hmac' only")
        for n, secret in enumerate(self.all_secrets, 1):
            if secret != secret.strip(" \t\r\n"):  # not any control character: RFC 4231's keys are 0x0b
                # A Kubernetes secret made from a file ends in a newline: loaded as it is, it
                # verified no delivery, and every one was refused 401 (GitHub's are then lost).
                raise ValueError(
                    f"secret #{n} begins or ends with whitespace (a newline from the file it was made "
                    "from?); the provider signs with the secret without it"
                )
        return self

    @property
    def all_secrets(self) -> list[str]:
        """Every usable secret. Empty ones (``${OLD_SECRET:-}`` when not rotating) are dropped:
        an empty HMAC key is one anybody can sign with."""
        return [s for s in (self.secret, *self.secrets) if s]


class WebhookEvent(Model):
    name: str
    filter: str | None = None
    input: Any = None

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("event name is required")
        return value


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Webhook(Model):
    slug: str
    verify: WebhookVerify
    id_from: BodyLocatorField | None = None  # when the provider has no delivery id
    events: list[WebhookEvent] = Field(min_length=1)
    rate_limit: RateLimit | None = None  # default: http.rate_limit.per_webhook

    @field_validator("slug")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"slug {value!r}: use letters, digits, '.', '_' and '-' (it is a URL path segment)")
        return value


class TracingConfig(Model):
    """OpenTelemetry spans from the adapters to the target runs; the exporter comes from ``OTEL_*``."""

    enabled: bool = False


class BridgeConfig(Model):
    project: str
    temporal: TemporalConfig = Field(default_factory=TemporalConfig)
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    kafka: list[KafkaConsumer] = Field(default_factory=list)
    amqp: list[AmqpConsumer] = Field(default_factory=list)
    webhooks: list[Webhook] = Field(default_factory=list)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    workflows: list[Workflow] = Field(default_factory=list)

    @field_validator("project")
    @classmethod
    def _sluggable(cls, value: str) -> str:
        if not slugify(value):
            raise ValueError(f"project name {value!r} has nothing to make a task queue of")
        return value

    @property
    def slug(self) -> str:
        return project_slug(self.project)

    @property
    def task_queue(self) -> str:
        return self.slug


def project_slug(project: str) -> str:
    return slugify(project)


def parse_config(data: Any, *, origin: str = "config") -> BridgeConfig:
    """Build a config from already-parsed YAML/JSON data; structure only (see the module doc)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the file must hold a mapping, found {type(data).__name__}")
    try:
        config = BridgeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, data, origin)) from None
    _check_unique(config, origin)
    return config


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, without the lines it quotes around the place: a secret
    written in the file beside a bad escape went into the error, and the log."""
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        return f"character U+{code:04X} is not allowed (at character {exc.position})"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # The problem quotes what it stopped at: one character is the point, more may be the value
    # (an unquoted secret that begins with `*` is an undefined alias, with `!` an unknown tag).
    problem = _QUOTED.sub(_point_only, exc.problem or exc.context or "cannot be read")
    return f"{problem}{where}"


_QUOTED = re.compile(r"'[^']*'")


def _point_only(quoted: re.Match[str]) -> str:
    """A quoted character (``'q'``, ``'\\t'``) or token (``'<stream end>'``) as it is; else ``'…'``."""
    text = quoted[0]
    return text if len(text) <= 4 or (text.startswith("'<") and text.endswith(">'")) else "'…'"


def read_config(path: str | Path, env: Mapping[str, str] | None = None) -> BridgeConfig:
    path = Path(path)
    origin = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deep to read") from None
    # After parsing, value by value: a secret with quotes or backslashes is taken verbatim, and
    # a ${VAR} in a comment is not required. A task's config keeps its references (bridge.envvars).
    try:
        return parse_config(interpolate_config(data, env, origin, task_kind=_task_kind), origin=origin)
    except RecursionError:  # a YAML alias that holds itself (`a: &x [*x]`) is a cycle, not a tree
        raise ConfigError(f"{origin}: nested too deep to read (an alias that holds itself?)") from None


def _check_unique(config: BridgeConfig, origin: str) -> None:
    slugs = [w.slug for w in config.webhooks]
    for slug in {s for s in slugs if slugs.count(s) > 1}:
        raise ConfigError(f"{origin}: webhook slug {slug!r} is declared twice")
    # An event's scope is its topic's or queue's name alone (kafka:{topic}, amqp:{queue}): the same
    # name on two clusters, brokers or vhosts gave both one scope, so the record at one's offset, or
    # a message id both producers use, took the other's run ids and started nothing.
    clusters: dict[str, tuple[int, frozenset[str]]] = {}
    for i, kafka in enumerate(config.kafka):
        servers = frozenset(s.strip().lower() for s in kafka.bootstrap_servers.split(",") if s.strip())
        for topic in kafka.topics:
            first = clusters.setdefault(topic, (i, servers))
            if first[1] != servers:
                raise ConfigError(
                    f"{origin}: kafka[{i}] reads topic {topic!r} from other bootstrap_servers than "
                    f"kafka[{first[0]}]: events are scoped by the topic's name alone (kafka:{topic}), so two "
                    "clusters' topics of one name would take each other's run ids; list one cluster's "
                    "servers alike in both, or read one of the topics under another name"
                )
    brokers: dict[str, tuple[int, tuple[str, int | None, str]]] = {}
    for i, amqp in enumerate(config.amqp):
        place = _amqp_place(amqp.url)
        first_amqp = brokers.setdefault(amqp.queue, (i, place))
        if first_amqp[1] != place:
            raise ConfigError(
                f"{origin}: amqp[{i}] consumes queue {amqp.queue!r} on another broker or vhost than "
                f"amqp[{first_amqp[0]}]: events are scoped by the queue's name alone (amqp:{amqp.queue}), so "
                "two queues of one name would take each other's run ids; give one of them another name"
            )


def _amqp_place(url: str) -> tuple[str, int | None, str]:
    """The broker and vhost an AMQP URL names (its credentials and options aside)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # not for this check to judge (a password with an unencoded "["): the URL itself
        return (url, None, "")
    port = port or (5671 if parts.scheme == "amqps" else 5672)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return ((parts.hostname or "localhost").lower(), port, vhost)
