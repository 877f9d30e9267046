"""The Grafana dashboard queries only what the bridge's /metrics serves.

Every PromQL expression of the dashboard (each panel's targets and the template variables) is cut
into the metric names it uses (identifiers starting ``signal_bridge_``) and the label names it
uses (matchers, ``by``/``without``/``on``/``ignoring`` lists, ``label_values``, ``{{legend}}``).
They are checked against a real scrape: the HTTP app built from compose/config.yaml, after a few
events made its labelled counters show series, fetched the way compose's Prometheus fetches it
(its ``metrics_path``, with the token of its credentials file). A metric name must be a series the
scrape has, or one its ``# TYPE`` lines promise (a labelled counter nothing counted yet); a label
must be on that metric's series. Counters and histograms are read through ``rate()``, gauges
never are, and ``histogram_quantile()`` gets ``_bucket`` series summed ``by (le)``.

Where compose and Grafana's provisioning find the dashboard: test_compose.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters.http import create_app
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.unit.test_compose import COMPOSE_DIR, effective_config, grafana_datasources, scrape_job, scrape_token

DASHBOARD_FILE = COMPOSE_DIR / "grafana" / "dashboards" / "signal-bridge.json"
EVENTS = "/api/v1/events"

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"(?<![A-Za-z0-9_:])signal_bridge_[A-Za-z0-9_:]*")
MATCHERS = re.compile(r"\{([^{}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([^,()]+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
RATE = r"\b(?:rate|irate|increase)\(\s*"
# The series a family of each type has (prometheus-client's counter families are named ``…_total``).
SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    legend: str = ""

    @property
    def promql(self) -> bool:
        """A PromQL expression; else a Grafana variable query (``label_values(metric, label)``)."""
        return not LABEL_VALUES.match(self.expr)


@dataclass
class Scrape:
    text: str
    content_type: str
    types: dict[str, str] = field(default_factory=dict)  # family name (``# TYPE``) → type
    series: dict[str, set[str]] = field(default_factory=dict)  # series name → its label names

    @classmethod
    def parse(cls, text: str, content_type: str = "text/plain; version=0.0.4") -> Scrape:
        scrape = cls(text, content_type)
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                scrape.types[name] = kind
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scrape.series.setdefault(sample.name, set()).update(sample.labels)
        return scrape

    def kind(self, name: str) -> str | None:
        """The type of the family a series name belongs to (``…_bucket`` → ``histogram``)."""
        for family, kind in self.types.items():
            if any(name == family + suffix for suffix in SUFFIXES.get(kind, ("",))):
                return kind
        return None

    def exists(self, name: str) -> bool:
        return name in self.series or self.kind(name) is not None


# --- reading the dashboard -------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels (collapsed rows keep theirs inside) included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def queries(dashboard: dict[str, Any]) -> list[Query]:
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            out.append(Query(where, target.get("expr", ""), target.get("legendFormat", "")))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else query or ""
            out.append(Query(f"variable ${variable['name']}", text))
            if variable.get("definition"):
                out.append(Query(f"variable ${variable['name']} definition", variable["definition"]))
    return out


def metric_names(expr: str) -> list[str]:
    """The metric names an expression uses, in order (string literals are not looked into)."""
    return METRIC.findall(STRING.sub('""', expr))


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for _, labels in GROUPING.findall(STRING.sub('""', expr))
        for label in labels.split(",")
        if label.strip()
    }


def label_names(query: Query) -> set[str]:
    """Every label the query selects on, groups by or shows in its legend."""
    found = LABEL_VALUES.match(query.expr)
    if found:
        return {found.group(2)}
    expr = STRING.sub('""', query.expr)
    matched = {label for body in MATCHERS.findall(expr) for label in MATCHER_LABEL.findall(body)}
    return matched | grouping_labels(expr) | set(LEGEND.findall(query.legend))


# --- the checks, as functions so a test can show they catch a bad dashboard --------------------


def missing_metrics(qs: list[Query], scrape: Scrape) -> list[str]:
    return [f"{q.where}: {name}" for q in qs for name in metric_names(q.expr) if not scrape.exists(name)]


def missing_labels(qs: list[Query], scrape: Scrape) -> list[str]:
    """A label must be on every metric the query names; a metric with no series yet (nothing
    counted it) cannot show one, so the scrape must have counted it."""
    out = []
    for q in qs:
        for name in metric_names(q.expr):
            carried = scrape.series.get(name, set())
            out += [f"{q.where}: {name} has no label {label!r}" for label in sorted(label_names(q) - carried)]
    return out


def legends_outside_grouping(qs: list[Query]) -> list[str]:
    """Every query aggregates, so a legend can show only the labels it groups by."""
    return [
        f"{q.where}: legend {{{{{label}}}}} is no 'by' label"
        for q in qs
        for label in sorted(set(LEGEND.findall(q.legend)) - grouping_labels(q.expr))
    ]


def misused_rates(qs: list[Query], scrape: Scrape) -> list[str]:
    """Counter and histogram series under rate()/increase() over a range; gauges never there;
    histogram_quantile() over ``_bucket`` series summed by ``le``."""
    out = []
    for q in (q for q in qs if q.promql):
        expr = STRING.sub('""', q.expr)
        for name in set(metric_names(expr)):
            kind = scrape.kind(name)
            in_rate = re.search(RATE + re.escape(name) + r"(\{[^{}]*\})?\[", expr)
            if kind == "gauge" and re.search(RATE + re.escape(name) + r"\b", expr):
                out.append(f"{q.where}: the gauge {name} under rate()")
            if kind in ("counter", "histogram") and not in_rate:
                out.append(f"{q.where}: {name} ({kind}) is not read through rate() over a range")
        if "histogram_quantile" in expr:
            if not all(name.endswith("_bucket") for name in metric_names(expr)):
                out.append(f"{q.where}: histogram_quantile() over other series than _bucket")
            if "le" not in grouping_labels(expr):
                out.append(f"{q.where}: histogram_quantile() without 'by (le)'")
    return out


# --- the scrape ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def scrape() -> Scrape:
    """compose's bridge, scraped as compose's Prometheus scrapes it, after one event of each
    outcome the dashboard's labels need (accepted; rejected, by reason)."""
    snap = Snapshot.compile(effective_config())
    pipeline = Pipeline(snap.routes, FakeSink())
    # What a worker reads from the dispatcher's stats query (bridge.runtime.app._export_stats).
    pipeline.metrics.child(pipeline.metrics.dispatcher_backlog, "dispatcher-shop").set(0)
    pipeline.metrics.child(pipeline.metrics.dispatcher_events, "dispatcher-shop", "started").set(0)
    app = create_app(pipeline, snap)
    auth = {"Authorization": f"Bearer {scrape_token()}"}
    async with AsyncTestClient(app) as c:
        accepted = await c.post(EVENTS, json={"name": "order.created", "payload": {"orderId": "A1"}}, headers=auth)
        unroutable = await c.post(EVENTS, json={"name": "nobody.listens", "payload": {}}, headers=auth)
        path = scrape_job().get("metrics_path", "/metrics")
        bare = await c.get(path)
        resp = await c.get(path, headers=auth)
    assert (accepted.status_code, unroutable.status_code) == (202, 422)
    assert bare.status_code == 401  # so Prometheus needs the token it is given
    assert resp.status_code == 200, resp.text
    return Scrape.parse(resp.text, resp.headers["content-type"])


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


# --- the dashboard against the scrape --------------------------------------------------------


def test_the_scrape_is_prometheus_text(scrape: Scrape) -> None:
    """Prometheus 3 refuses a scrape without a content type it knows."""
    media, _, params = scrape.content_type.partition(";")
    assert media.strip() == "text/plain"
    assert "version=0.0.4" in params.replace(" ", "")
    assert scrape.types and scrape.series


def test_every_panel_queries_the_bridge(dashboard: dict[str, Any]) -> None:
    graphs = [p for p in panels(dashboard) if p.get("type") != "row"]
    assert graphs
    for panel in graphs:
        assert panel.get("targets"), f"panel {panel.get('title')!r} has no query"
    for q in queries(dashboard):
        assert metric_names(q.expr), f"{q.where}: {q.expr!r} names no signal_bridge_ metric"


def test_every_metric_the_dashboard_queries_is_in_metrics(dashboard: dict[str, Any], scrape: Scrape) -> None:
    missing = missing_metrics(queries(dashboard), scrape)
    assert not missing, "not in /metrics:\n" + "\n".join(missing)


def test_every_label_the_dashboard_uses_is_on_its_metrics(dashboard: dict[str, Any], scrape: Scrape) -> None:
    qs = queries(dashboard)
    wrong = missing_labels(qs, scrape) + legends_outside_grouping([q for q in qs if q.promql])
    assert not wrong, "\n".join(wrong)


def test_counters_and_histograms_are_read_through_rate(dashboard: dict[str, Any], scrape: Scrape) -> None:
    wrong = misused_rates(queries(dashboard), scrape)
    assert not wrong, "\n".join(wrong)


def test_the_dashboard_shows_what_operators_watch(dashboard: dict[str, Any]) -> None:
    """Events received, accepted and rejected (by adapter and reason), signal batch sizes,
    submit latency and what waits for Temporal."""
    qs = [q for q in queries(dashboard) if q.promql]
    used = {name for q in qs for name in metric_names(q.expr)}
    assert {
        "signal_bridge_events_received_total",
        "signal_bridge_events_accepted_total",
        "signal_bridge_events_rejected_total",
        "signal_bridge_signal_batch_events_bucket",
        "signal_bridge_submit_seconds_bucket",
        "signal_bridge_inflight_events",
    } <= used
    rejected = [q for q in qs if "signal_bridge_events_rejected_total" in metric_names(q.expr)]
    assert any({"adapter", "reason"} <= grouping_labels(q.expr) for q in rejected)


def test_panels_read_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    uids = {source["uid"] for source in grafana_datasources()}
    for panel in panels(dashboard):
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] in uids, f"panel {panel.get('title')!r}"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]


# --- the checks catch what they are for ------------------------------------------------------


def test_the_tokenizer_finds_metric_and_label_names() -> None:
    q = Query(
        "q",
        'sum by (adapter, reason) (rate(signal_bridge_events_rejected_total{adapter=~"signal_bridge_x"}[5m]))'
        " / ignoring(reason) signal_bridge_inflight_events",
        "{{adapter}} {{ reason }}",
    )
    assert metric_names(q.expr) == ["signal_bridge_events_rejected_total", "signal_bridge_inflight_events"]
    assert label_names(q) == {"adapter", "reason"}
    assert label_names(Query("v", "label_values(signal_bridge_events_received_total, adapter)")) == {"adapter"}


def test_a_metric_or_label_that_does_not_exist_is_caught(scrape: Scrape) -> None:
    bad = [
        Query("no _total", "sum(rate(signal_bridge_events_received[5m]))"),
        Query("histogram base name", "signal_bridge_submit_seconds"),
        Query("made up", "sum(rate(signal_bridge_events_lost_total[5m]))"),
    ]
    assert len(missing_metrics(bad, scrape)) == 3
    door = Query("old label", "sum by (door) (rate(signal_bridge_events_received_total[5m]))", "{{door}}")
    assert missing_labels([door], scrape) == ["old label: signal_bridge_events_received_total has no label 'door'"]
    assert legends_outside_grouping([Query("l", "sum(rate(signal_bridge_events_received_total[5m]))", "{{adapter}}")])


def test_a_misused_rate_is_caught(scrape: Scrape) -> None:
    bad = [
        Query("raw counter", "sum(signal_bridge_events_received_total)"),
        Query("gauge rate", "rate(signal_bridge_inflight_events[5m])"),
        Query("quantile without le", "histogram_quantile(0.5, sum(rate(signal_bridge_submit_seconds_bucket[5m])))"),
        Query("quantile of a sum", "histogram_quantile(0.5, sum by (le) (rate(signal_bridge_submit_seconds_sum[5m])))"),
    ]
    assert [w.split(":")[0] for w in misused_rates(bad, scrape)] == [q.where for q in bad]
