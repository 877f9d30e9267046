"""Prometheus metrics. One registry per bridge instance so several can live in one test process."""

from __future__ import annotations

from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("signal_bridge_events_received", "Events read by an adapter", ["adapter"], registry=r)
        self.accepted = Counter(
            "signal_bridge_events_accepted",
            "Events Temporal accepted (the adapter then acknowledged them)",
            ["adapter"],
            registry=r,
        )
        self.rejected = Counter(
            "signal_bridge_events_rejected",
            "Events refused for good (4xx or dead letter), by reason",
            ["adapter", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "signal_bridge_events_dropped",
            "Rejected events skipped without a dead letter, by reason",
            ["adapter", "reason"],
            registry=r,
        )
        self.unavailable = Counter(
            "signal_bridge_temporal_unavailable",
            "Submissions Temporal did not accept; the adapter retries or answers 503",
            ["adapter"],
            registry=r,
        )
        self.overloaded = Counter(
            "signal_bridge_overloaded",
            "Submissions refused because too many events already waited for Temporal in this process",
            ["adapter"],
            registry=r,
        )
        self.kafka_poll_failures = Counter(
            "signal_bridge_kafka_poll_failures",
            "Kafka polls that raised (a record the client cannot read, a codec it lacks, a broker error), "
            "by consumer check and error type",
            ["check", "error"],
            registry=r,
        )
        self.signals = Counter("signal_bridge_signals_sent", "Signal-with-start calls that returned", registry=r)
        self.signals_busy = Counter(
            "signal_bridge_signals_busy",
            "Signals sent again because Temporal refused them while the dispatcher was continuing-as-new",
            registry=r,
        )
        self.batch_size = Histogram(
            "signal_bridge_signal_batch_events",
            "Events per signal",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.submit_seconds = Histogram(
            "signal_bridge_submit_seconds",
            "Time from handing events to the dispatcher client until Temporal held them",
            registry=r,
        )
        self.inflight = Gauge("signal_bridge_inflight_events", "Events waiting for Temporal", registry=r)
        # Read from each dispatcher's stats query by the worker processes (every STATS_INTERVAL s):
        # its counters since its first run, and the events queued in it now.
        self.dispatcher_events = Gauge(
            "signal_bridge_dispatcher_events",
            "A dispatcher's counters: received, started, signaled, missing, duplicates, unroutable, failed, "
            "malformed, filter_limited (since its first run, as of the last stats query)",
            ["dispatcher", "outcome"],
            registry=r,
        )
        self.dispatcher_backlog = Gauge(
            "signal_bridge_dispatcher_backlog",
            "Events a dispatcher received and has not done: queued, or their starts in flight",
            ["dispatcher"],
            registry=r,
        )
        # A worker process's starts (dispatcher.slots), read when scraped.
        self.starts_in_flight = Gauge(
            "signal_bridge_starts_in_flight",
            "Target starts and signals waiting on Temporal in this process",
            registry=r,
        )
        self.dispatcher_accept_bytes = Gauge(
            "signal_bridge_dispatcher_accept_bytes",
            "Bytes of events a dispatcher can still take in its run, as this process last looked "
            "(its stats query's accept_bytes); at 0 the adapters refuse its events as overloaded. "
            "-1 when it does not say",
            ["dispatcher"],
            registry=r,
        )
        self.dispatcher_tasks_failing = Gauge(
            "signal_bridge_dispatcher_tasks_failing",
            "1 while a dispatcher's workflow tasks fail, as this process last looked when its stats "
            "query got no answer (Temporal reports the run's problem, or its pending task is on its "
            "third attempt or later): it starts nothing (docs/operations.md, 'A dispatcher that "
            "fails every workflow task'); 0 once it answers",
            ["dispatcher"],
            registry=r,
        )
        self.start_share = Gauge(
            "signal_bridge_start_share",
            "The share of the start window the starts may use now: below 1 while the adapters "
            "in this process, or the ingress processes that signal its dispatchers, hand events over slowly",
            registry=r,
        )
        self.start_window = Gauge(
            "signal_bridge_start_window",
            "Starts this process may have in flight now: by their latency while clients wait on the hand-over "
            "(at most dispatcher.starts_in_flight; dispatcher.start_latency_tolerance), else "
            "max(dispatcher.starts_in_flight, dispatcher.batch_size)",
            registry=r,
        )
        self.config_reloads = Counter(
            "signal_bridge_config_reloads",
            "Config reloads (SIGHUP or the file watcher): applied, or refused with the previous config "
            "kept (the log says why)",
            ["result"],
            registry=r,
        )
        self.config_refused = Gauge(
            "signal_bridge_config_refused",
            "1 while the config file was last refused: the config in force is older than the file; "
            "0 once a reload applies it",
            registry=r,
        )
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, looked up once per label set: ``labels()`` checks its
        arguments and takes a lock on every call, too much for once per event."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)  # what the metric's own labels() returned

    def render(self) -> bytes:
        return generate_latest(self.registry)
