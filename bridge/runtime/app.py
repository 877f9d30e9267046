"""Wiring: one :class:`Bridge` runs any of worker, HTTP adapter and queue adapters in one process.

Start order: Temporal (embedded when no address) → client → worker and dispatcher → adapters.
Stop order is the reverse, and each step finishes what it holds: adapters stop taking events and
finish in-flight submissions (consumers commit/ack what Temporal accepted), the dispatcher client
flushes, the worker drains, the embedded server stops last. The dispatcher itself is never
terminated: its buffered signals stay in Temporal for the next worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import uvicorn
from temporalio.client import Client, Interceptor
from temporalio.service import RPCError
from temporalio.worker import Worker

from adapters import amqp, kafka
from adapters.http import create_app
from bridge.adapter import Adapter, ConsumerReadiness
from bridge.aio import how_it_ended
from bridge.config import BridgeConfig, HttpConfig
from bridge.errors import BridgeError, ConfigError, Unavailable
from bridge.logsafe import safe
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline, Tracer
from bridge.runtime.embedded import EmbeddedTemporal
from bridge.runtime.http_protocol import HeadTimeoutProtocol
from bridge.runtime.lookup import Lookup
from bridge.runtime.settings import Settings
from bridge.snapshot import Snapshot, SnapshotSource
from dispatcher import search
from dispatcher.client import DispatcherClient, handover_seconds, query_stats
from dispatcher.contract import STAT_KEYS
from dispatcher.worker import build_worker

log = logging.getLogger(__name__)
Role = Literal["all", "worker", "ingress"]


def server_config(app: Any, http: HttpConfig) -> uvicorn.Config:
    """How uvicorn serves ``app``: the request bounds of ``http``, and the client's address taken
    from X-Forwarded-For only when a trusted proxy (``http.trusted_proxies``) sent the request."""
    return uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_level="warning",
        log_config=None,  # logging is the process's (bridge.runtime.logs): no handler of uvicorn's own
        access_log=False,  # the bridge logs what it does with each event; no line per request
        lifespan="on",
        timeout_graceful_shutdown=30,
        limit_concurrency=http.max_concurrent_requests,
        http=HeadTimeoutProtocol,  # a request's head must come within HEAD_TIMEOUT
        proxy_headers=True,
        forwarded_allow_ips=list(http.trusted_proxies),
    )


class _Uvicorn(uvicorn.Server):
    """Uvicorn without its own signal handling: the bridge owns shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    def install_signal_handlers(self) -> None:
        return None

    async def serve(self, sockets: Any = None) -> None:
        """uvicorn ends with ``sys.exit`` when it cannot bind: inside a task, asyncio re-raises that
        out of the event loop and everything stops at once, the embedded server left behind. Here
        it is an error of the HTTP task, which the bridge reports and stops in order."""
        try:
            await super().serve(sockets)
        except SystemExit as exc:
            raise BridgeError(f"the HTTP server could not start (exit {exc.code})") from None


WATCH_INTERVAL = 2.0

FAILURE_LOG_SECONDS = 60.0
"""At most one line this often while the watcher's reload keeps failing the same way."""

HTTP_AT_START = ("host", "port", "max_concurrent_requests", "trusted_proxies")
"""What of ``http:`` the HTTP server is given once, at start (:func:`server_config`)."""


def read_at_start(start: BridgeConfig, new: BridgeConfig) -> dict[str, tuple[Any, Any]]:
    """Each setting a process reads only at start, by name: (its value at start, in ``new``)."""
    pairs: dict[str, tuple[Any, Any]] = {
        "project": (start.project, new.project),
        "temporal": (start.temporal, new.temporal),
        "dispatcher.shards": (start.dispatcher.shards, new.dispatcher.shards),
        "kafka": (start.kafka, new.kafka),
        "amqp": (start.amqp, new.amqp),
        "tracing": (start.tracing, new.tracing),
    }
    pairs.update({f"http.{k}": (getattr(start.http, k), getattr(new.http, k)) for k in HTTP_AT_START})
    return pairs


READY_PING_EVERY = 1.0  # seconds a /readyz ping of Temporal stands for
STATS_INTERVAL = 15.0  # seconds between reads of the dispatchers' stats query, for the metrics


async def connect(
    address: str,
    namespace: str,
    *,
    api_key: str | None = None,
    tls: bool | None = None,
    timeout: float = 30.0,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Client.connect(
                address, namespace=namespace, api_key=api_key, tls=tls, interceptors=interceptors
            )
        except Exception as exc:
            if time.monotonic() > deadline:
                raise BridgeError(f"cannot connect to Temporal at {address}: {exc}") from exc
            await asyncio.sleep(0.5)


class Bridge:
    def __init__(
        self,
        config: BridgeConfig | Snapshot,
        *,
        config_path: str | Path | None = None,
        role: Role = "all",
        insecure: bool = False,
        data_dir: str | Path = ".signal-bridge",
        client: Client | None = None,
        watch: bool = True,
        worker_http: bool = False,
    ) -> None:
        """``worker_http``: a ``worker`` serves ``/healthz``, ``/readyz`` and ``/metrics`` on the
        config's HTTP port (it serves nothing otherwise); the other roles serve them anyway."""
        snapshot = config if isinstance(config, Snapshot) else Snapshot.compile(config)
        self.config = snapshot.config  # as started: addresses, ports and the project never reload
        self.source = SnapshotSource(snapshot, config_path, prepare=self._keep_process_settings)
        self.watch = watch
        self._watcher: asyncio.Task[None] | None = None
        self.role = role
        self.worker_http = worker_http and role == "worker"
        self.insecure = insecure
        self.data_dir = Path(data_dir)
        self.client = client
        self.metrics = Metrics()
        self.embedded: EmbeddedTemporal | None = None
        self.worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self.dispatcher: DispatcherClient | None = None
        self._tell_dispatcher = False  # a reload swapped the config, and the dispatcher did not hear of it
        self._swaps = 0  # snapshots swapped in by reloads
        self.pipeline: Pipeline | None = None
        self.adapters: list[Adapter] = []
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None
        self._ping: asyncio.Task[bool] | None = None  # /readyz's ping of Temporal in flight
        self._pinged = (-READY_PING_EVERY, False)  # (when, whether it answered)

    @property
    def takes_events(self) -> bool:
        return self.role in ("all", "ingress")

    async def start(self) -> None:
        cfg = self.config
        if self.takes_events:
            self.check_auth()
        if self.client is None:
            address = cfg.temporal.address
            if not address:
                self.embedded = EmbeddedTemporal(
                    self.data_dir,
                    ui=cfg.temporal.ui,
                    ui_port=cfg.temporal.ui_port,
                    namespace=cfg.temporal.namespace,
                    db_filename=cfg.temporal.db_filename,
                )
                address = await self.embedded.start()
            interceptors: list[Interceptor] = []
            if cfg.tracing.enabled:  # imported only then: off costs nothing
                from bridge.runtime import tracing

                tracing.install()
                interceptors += tracing.interceptors()
            self.client = await connect(
                address,
                cfg.temporal.namespace,
                api_key=cfg.temporal.api_key,
                tls=cfg.temporal.tls,
                interceptors=interceptors,
            )
        self.dispatcher = DispatcherClient(
            self.client,
            cfg,
            self.metrics,
            retry_after=lambda: self.source.current.config.http.retry_after_seconds,
            handover_target=lambda: handover_seconds(self.source.current.config),
        )
        if self.role in ("all", "worker"):
            attributes = await self._search_attributes()
            # Its starts give way to its adapters' hand-over (dispatcher.slots), if it has adapters.
            handover = self.dispatcher.handover if self.takes_events else None
            self.worker = build_worker(
                self.client,
                self.source,
                cfg.task_queue,
                search_attributes=attributes,
                tracing=cfg.tracing.enabled,
                handover=handover,
                metrics=self.metrics,
            )
            self._worker_task = asyncio.create_task(self.worker.run(), name="worker")
            await self.dispatcher.ensure_started()
            self._stats_task = asyncio.create_task(self._export_stats(), name="dispatcher-stats")
        if self.worker_http:  # its operational endpoints only: no adapter, so nothing submits
            self.pipeline = Pipeline(lambda: self.source.current.routes, self.dispatcher, self.metrics)
            await self._start_http(ops_only=True)
        if self.takes_events:
            self.pipeline = Pipeline(
                lambda: self.source.current.routes,
                self.dispatcher,
                self.metrics,
                max_pending=cfg.dispatcher.max_pending_events,
                max_pending_per_source=cfg.dispatcher.max_pending_per_source,
                retry_after=cfg.http.retry_after_seconds,
                tracer=self._event_tracer(),
            )
            self.dispatcher.open()  # the first look at the dispatchers' room, before any event
            for adapter in build_adapters(cfg, self.pipeline):
                await adapter.start()
                self.adapters.append(adapter)
            await self._start_http()
        if self.watch and self.source.path is not None:
            self._watcher = asyncio.create_task(self._watch(), name="config-watcher")
        log.info(
            "signal-bridge started project=%s role=%s temporal=%s http=%s",
            cfg.project,
            self.role,
            self.embedded.address if self.embedded else cfg.temporal.address,
            self.http_port,
        )

    def _event_tracer(self) -> Tracer | None:
        if not self.config.tracing.enabled:
            return None
        from bridge.runtime import tracing

        tracing.install()
        return tracing.EventTracer()

    async def look_up(self, event_id: str, source: str) -> list[dict[str, Any]]:
        """The runs an event started (``GET /api/v1/events/{id}``), from Temporal's visibility."""
        assert self.client is not None
        ui = self.config.temporal.ui_url or (self.embedded.ui_url if self.embedded else None)
        finder = Lookup(self.client, self.config.project, self.source.current.routes, ui=ui)
        try:
            runs = await asyncio.wait_for(finder.event(event_id, source), timeout=10)
        except (RPCError, TimeoutError) as exc:
            # The error's text goes to the log only: it may name Temporal's hosts and TLS setup.
            why = exc.status.name if isinstance(exc, RPCError) else "timed out"
            log.warning("event look-up failed: %s", safe(str(exc) or why, 500))
            raise Unavailable(
                f"Temporal did not answer the look-up ({why})", self.config.http.retry_after_seconds
            ) from exc
        return [run.to_dict() for run in runs]

    async def _export_stats(self) -> None:
        """Every STATS_INTERVAL s, each dispatcher's stats query as metrics (a failed query is
        skipped: the dispatcher may be continuing-as-new, or Temporal away)."""
        assert self.dispatcher is not None
        counters = STAT_KEYS
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            for shard, wid in enumerate(self.dispatcher.ids):
                handle = self.dispatcher.handle(shard)
                try:
                    stats: dict[str, Any] = dict(
                        await query_stats(handle, patience=5, rpc_timeout=timedelta(seconds=5))
                    )
                except Exception as exc:
                    log.debug("stats of %s not read: %s", wid, exc)
                    continue
                for key in counters:
                    self.metrics.child(self.metrics.dispatcher_events, wid, key).set(stats.get(key, 0))
                self.metrics.child(self.metrics.dispatcher_backlog, wid).set(stats.get("backlog", 0))

    async def _search_attributes(self) -> bool:
        """Whether the namespace has the SignalBridge* search attributes; says so loudly if not."""
        assert self.client is not None
        namespace = self.config.temporal.namespace
        try:
            absent = await search.missing(self.client, namespace)
        except Exception as exc:  # an API key without operator rights, an old server
            log.warning(
                "could not list the search attributes of namespace %s (%s); runs start without them", namespace, exc
            )
            return False
        if absent:
            log.error(
                "namespace %s lacks the search attributes %s: target runs start without them, and looking "
                "events up by id finds nothing. Register them with: signal-bridge setup --config FILE",
                namespace,
                ", ".join(absent),
            )
            return False
        return True

    def check_auth(self) -> None:
        """Refuse to take events without a bearer token, unless told to; then say so loudly."""
        if self.source.current.tokens:
            return
        if not self.insecure:
            raise ConfigError(
                "no bearer token configured under http.auth.tokens; add one, or pass --insecure "
                "to accept unauthenticated events"
            )
        log.warning(
            "insecure mode: POST /api/v1/events accepts events from anyone who can reach %s:%s",
            self.config.http.host,
            self.config.http.port,
        )

    async def _start_http(self, *, ops_only: bool = False) -> None:
        assert self.pipeline is not None
        app = create_app(
            self.pipeline,
            self.source,
            ready=self.ready,
            insecure=self.insecure,
            lookup=self.look_up,
            consumers=self.consumers,
            ops_only=ops_only,
        )
        server = _Uvicorn(server_config(app, self.config.http))
        self._http = server
        self._http_task = asyncio.create_task(server.serve(), name="http")
        while not server.started:
            if self._http_task.done():
                # uvicorn exits (SystemExit) when it cannot bind: an error of ours, not the process's end.
                task, self._http_task, self._http = self._http_task, None, None
                try:
                    task.result()
                except (Exception, SystemExit) as exc:
                    raise BridgeError(f"HTTP server did not start on port {self.config.http.port}: {exc!r}") from None
                raise BridgeError(f"HTTP server did not start on port {self.config.http.port}")
            await asyncio.sleep(0.02)
        self.http_port = server.servers[0].sockets[0].getsockname()[1]

    def _keep_process_settings(self, config: BridgeConfig) -> BridgeConfig:
        """A reloaded file keeps what this process was started with (:func:`read_at_start`): the
        project, Temporal, the HTTP server's listener, connection limit and trusted proxies, the
        shards, the consumers and tracing; a change to any of them is logged as needing a restart.
        Kept in the snapshot, not only in the servers: the unsigned webhook requests' room is
        half of the snapshot's ``max_concurrent_requests``, and raised past uvicorn's limit it was
        never full, so a few addresses trickling bodies held every connection.

        A process that takes events refuses a file without a bearer token as it would at start
        (unless insecure): the events API would answer every request 401, or, insecure, be open
        to anyone."""
        overridden = Settings.from_env().apply(config)  # as the file was read at start
        if changed := [name for name, (old, new) in read_at_start(self.config, overridden).items() if old != new]:
            log.warning("config reload: %s take effect only after a restart", ", ".join(changed))
        if self.takes_events and not config.http.auth.tokens:
            if not self.insecure:
                raise ConfigError(
                    "no bearer token under http.auth.tokens: a process that takes events needs one (or --insecure)"
                )
            log.warning("insecure mode after reload: POST /api/v1/events accepts events from anyone")
        start = self.config
        http = config.http.model_copy(update={k: getattr(start.http, k) for k in HTTP_AT_START})
        dispatcher = config.dispatcher.model_copy(update={"shards": start.dispatcher.shards})
        kept = {"project": start.project, "temporal": start.temporal, "kafka": start.kafka, "amqp": start.amqp}
        return config.model_copy(update={**kept, "tracing": start.tracing, "http": http, "dispatcher": dispatcher})

    async def reload(self) -> bool:
        """Re-read the config file; when it compiled, tell the dispatcher to reload its routes.

        The swap is done before the dispatcher is told: if telling it fails (Temporal out of
        reach), the file is not read again, so :meth:`_watch` tells it again until it hears."""
        refusals = self.source.refusals
        swapped = self.source.reload()
        if swapped or self.source.refusals != refusals:
            self.metrics.child(self.metrics.config_reloads, "applied" if swapped else "refused").inc()
            self.metrics.config_refused.set(0 if swapped else 1)
        if swapped:
            self._swaps += 1
            if self.pipeline is not None:  # what the pipeline was given at start, as the new file says
                settings = self.source.current.config
                self.pipeline.max_pending = settings.dispatcher.max_pending_events
                self.pipeline.max_pending_per_source = settings.dispatcher.max_pending_per_source
                self.pipeline.retry_after = settings.http.retry_after_seconds
        if swapped and self.dispatcher is not None and self.role in ("all", "worker"):
            self._tell_dispatcher = True
            await self._told()
        log.info("reload requested project=%s applied=%s", self.config.project, swapped)
        return swapped

    async def _told(self) -> None:
        """Tell the dispatcher to load the routes again. A swap made while it was being told (a
        SIGHUP's reload and the watcher's overlap) leaves it to be told once more."""
        assert self.dispatcher is not None
        swaps = self._swaps
        await self.dispatcher.reload()
        if self._swaps == swaps:
            self._tell_dispatcher = False

    async def _watch(self) -> None:
        """Reload when the file's modification time changes (checked every WATCH_INTERVAL s), and
        tell the dispatcher of a reload it has not heard of yet. A failure is logged with its
        traceback once, then once a minute with how many more there were: while Temporal is out
        of reach the dispatcher is told again every WATCH_INTERVAL s, and each was a traceback.
        Another kind of error than the one failing it is a new failure, with its traceback."""
        failing: type[Exception] | None = None  # the kind of error failing it now
        more, last = 0, 0.0
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                if self.source.changed():
                    await self.reload()
                elif self._tell_dispatcher:
                    await self._told()
                    log.info("config reload: the dispatcher was told, after an earlier failure")
                failing = None
            except Exception as exc:
                now = time.monotonic()
                if failing is not type(exc):  # a new kind of error: its traceback
                    log.exception("config reload failed")
                    failing, more, last = type(exc), 0, now
                elif (more := more + 1) and now - last >= FAILURE_LOG_SECONDS:
                    log.warning("config reload still failing (%d more attempts): %r", more, exc)
                    more, last = 0, now

    def consumers(self) -> list[ConsumerReadiness]:
        """This bridge's Kafka consumers, for ``/readyz``: partitions, missing topics, state."""
        found = [a for a in self.adapters if isinstance(a, kafka.KafkaAdapter)]
        return [a.readiness() for a in sorted(found, key=lambda a: (a.name, a.group_id))]

    async def ready(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        if self.dispatcher is not None:  # and its client does not hold Temporal down (it refuses events then)
            checks["temporal"] = not self.dispatcher.down and await self._temporal_answers(self.dispatcher)
        if self.role in ("all", "worker"):
            checks["worker"] = self._worker_task is not None and not self._worker_task.done()
        for adapter in self.adapters:
            checks[adapter.name] = adapter.healthy()
        return checks

    async def _temporal_answers(self, dispatcher: DispatcherClient) -> bool:
        """Whether Temporal answered a ping, at most READY_PING_EVERY seconds ago. ``/readyz`` needs
        no token: without this, each request would make a call to Temporal (and many at once as
        many), out of the budget the submissions need. Concurrent requests share one ping."""
        at, answered = self._pinged
        if time.monotonic() - at < READY_PING_EVERY:
            return answered
        if self._ping is None or self._ping.done():
            self._ping = asyncio.create_task(dispatcher.ping(), name="readyz-ping")
        answered = await asyncio.shield(self._ping)
        self._pinged = (time.monotonic(), answered)
        return answered

    def failure(self) -> str | None:
        """What of this process ended without being asked to (its worker, its HTTP server, its
        embedded Temporal server, a queue adapter's loop), or None while they all run."""
        if self._worker_task is not None and self._worker_task.done():
            return "the worker stopped" + how_it_ended(self._worker_task)
        if self._http_task is not None and self._http_task.done():
            return "the HTTP server stopped" + how_it_ended(self._http_task)
        if self.embedded is not None and self.embedded.process is not None and not self.embedded.running:
            return f"the embedded Temporal server exited with {self.embedded.process.returncode}"
        for adapter in self.adapters:
            why = adapter.ended()
            if why is not None:
                return f"the {adapter.name} adapter stopped consuming: {why}"
        return None

    async def failed(self, every: float = 1.0) -> str:
        """Wait until :meth:`failure` has something to say, and say it."""
        while True:  # the process's embedded server is polled: no event to wait on
            why = self.failure()
            if why is not None:
                return why
            await asyncio.sleep(every)

    async def stop(self) -> None:
        for task in (self._watcher, self._stats_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            try:
                await self._http_task
            except (Exception, SystemExit):  # whatever the server ended with, the rest must stop too
                log.exception("the HTTP server did not stop cleanly")
        for adapter in reversed(self.adapters):
            try:
                await adapter.stop()
            except Exception:
                log.exception("adapter %s did not stop cleanly", adapter.name)
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.worker is not None and self._worker_task is not None:
            await self.worker.shutdown()
            try:
                await self._worker_task
            except Exception:
                log.exception("the worker ended with an error")
        if self.embedded is not None:
            self.embedded.stop()
        log.info("signal-bridge stopped project=%s", self.config.project)


def build_adapters(config: BridgeConfig, pipeline: Pipeline) -> list[Adapter]:
    """One queue adapter per configured ``kafka:`` and ``amqp:`` entry (HTTP is served apart)."""
    out: list[Adapter] = []
    out.extend(kafka.build(entry, pipeline, config) for entry in config.kafka)
    out.extend(amqp.build(entry, pipeline, config) for entry in config.amqp)
    return out


async def run_until_signalled(bridge: Bridge) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(bridge.reload())
        reloads.add(task)
        task.add_done_callback(reloaded)

    def reloaded(task: asyncio.Task[bool]) -> None:
        reloads.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # else "never retrieved"
            log.warning("config reload on SIGHUP failed (the file watcher tells the dispatcher again): %r", exc)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await bridge.start()
    except BaseException:
        await bridge.stop()
        raise
    # What start-up allocated (modules, the config, clients) stays: keep it out of every later
    # collection, whose full passes otherwise stall every request in flight during a burst.
    gc.freeze()
    if bridge.embedded and bridge.embedded.ui_url:
        log.info(
            "Temporal UI: %s/namespaces/%s/workflows",
            bridge.embedded.ui_url,
            bridge.config.temporal.namespace,
        )
    asked, died = asyncio.create_task(stop.wait()), asyncio.create_task(bridge.failed())
    await asyncio.wait({asked, died}, return_when=asyncio.FIRST_COMPLETED)
    for task in (asked, died):
        task.cancel()
    why = died.result() if died.done() and not died.cancelled() else None
    if why is not None:
        # A process that stays up without its worker (or server) takes events that nothing
        # starts, or answers 503 for ever, and a supervisor would see it exit 0 at last.
        log.error("%s; stopping, to be restarted", why)
    else:
        log.info("shutting down: no new events; finishing in-flight submissions")
    await bridge.stop()
    if why is not None:
        raise BridgeError(why)
