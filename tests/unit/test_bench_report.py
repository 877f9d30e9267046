"""The bench's pure parts: percentiles, wrk's output, /proc parsing, rows and the table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.load import Sent, latency_row, throughput_row
from bench.procs import bridge_config
from bench.report import (
    HEADER,
    Row,
    cpu_model,
    line,
    mem_total_gib,
    parse_wrk,
    pct,
    peak_rss_mib,
    status_summary,
    table,
)

WRK = """\
Running 10s test @ http://127.0.0.1:8080/api/v1/events
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   314.39ms  433.40ms   1.65s    82.20%
    Req/Sec   430.68    250.63     0.90k    61.29%
  8395 requests in 10.04s, 1.42MB read
  Socket errors: connect 0, read 3, write 0, timeout 7
  Non-2xx or 3xx responses: 120
Requests/sec:    836.12
Transfer/sec:    145.10KB
status 202 8275
status 503 120
latency p50 70.975 ms
latency p99 1634.514 ms
"""


def test_pct_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert pct(values, 0.5) == 50.0
    assert pct(values, 0.99) == 99.0
    assert pct(values, 1.0) == 100.0
    assert pct(list(reversed(values)), 0.5) == 50.0  # order does not matter
    assert pct([3.0], 0.99) == 3.0
    assert pct([1.0, 2.0], 0.5) == 1.0
    assert pct([1.0, 2.0], 0.99) == 2.0
    assert math.isnan(pct([], 0.5))


def test_parse_wrk_summary_and_script_lines() -> None:
    r = parse_wrk(WRK)
    assert r.requests == 8395
    assert r.seconds == pytest.approx(10.04)
    assert r.rps == pytest.approx(836.12)
    assert r.non_2xx == 120
    assert r.statuses == {202: 8275, 503: 120}
    assert r.socket_errors == {"connect": 0, "read": 3, "write": 0, "timeout": 7}
    assert r.accepted == 8275
    assert r.not_accepted == 120 + 7  # a 503 overloaded and a timed-out request are not accepted
    assert r.p50 == pytest.approx(0.070975)
    assert r.p99 == pytest.approx(1.634514)
    assert status_summary(r) == "202: 8275, 503: 120, socket errors read 3, timeout 7"


def test_parse_wrk_without_errors_or_script_output() -> None:
    r = parse_wrk("  100 requests in 1.00m, 10KB read\nRequests/sec:      1.67\n")
    assert (r.requests, r.seconds) == (100, 60.0)
    assert r.rps == pytest.approx(1.67)
    assert r.statuses == {} and r.socket_errors == {} and r.p50 is None
    assert status_summary(r) == "no answers"


def test_proc_parsing() -> None:
    assert peak_rss_mib("Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  153600 kB\nVmRSS:\t 100 kB\n") == 150.0
    assert peak_rss_mib("Name:\tpython\n") is None
    assert cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n") == "Intel(R) Xeon(R) Processor"
    assert cpu_model("processor : 0\nHardware : BCM2835\n") == "BCM2835"
    assert cpu_model("") == "unknown CPU"
    assert mem_total_gib("MemTotal:       24683520 kB\nMemFree: 1 kB\n") == pytest.approx(23.54, abs=0.01)
    assert mem_total_gib("") is None


def test_row_ratio_and_line() -> None:
    base = Row("ceiling", 40.0, ratio=1.0, base="ceiling")
    row = Row("http child: throughput", 10.0).against(base, "ceiling")
    assert row.ratio == 0.25 and row.base == "ceiling"
    assert Row("x", 10.0).against(None, "ceiling").ratio is None
    assert Row("x", None).against(base, "ceiling").ratio is None
    row.p50, row.p99, row.notes = 0.5, 1.25, ["a", "b"]
    text = line(row)
    assert text.startswith("http child: throughput")
    assert "10.0 starts/s" in text and "0.25 ceiling" in text and "500.0" in text and "1250.0" in text
    assert text.endswith("a; b")
    assert "FAILED" in line(Row("kafka child", None, notes=["FAILED: boom"]))
    rendered = table([base, row], ["context line"])
    assert rendered.splitlines()[0] == "context line" and HEADER in rendered


def test_throughput_row_from_first_send_to_last_start() -> None:
    sent = Sent(began=100.0, ended=102.0, acked={f"e-{i}": 101.0 for i in range(10)})
    started = {f"e-{i}": 100.5 + i * 0.5 for i in range(10)}  # the last at 105.0
    row = throughput_row("t", 10, sent, started, Row("ceiling", 4.0))
    assert row.rate == pytest.approx(2.0)  # 10 starts in 5 s
    assert row.ratio == pytest.approx(0.5)
    partial = throughput_row("t", 10, sent, dict(list(started.items())[:4]), None)
    assert any("only 4/10" in n for n in partial.notes)
    assert "FAILED: 6 acknowledged events started no run" in partial.notes, "a loss fails the row"
    assert not any(n.startswith("FAILED") for n in row.notes)


def test_a_refused_event_is_noted_not_failed() -> None:
    """wrk: 8 answered 202 and started, 2 refused (503): the row notes them and does not fail."""
    sent = Sent(began=100.0, ended=102.0, accepted=8, refused={"503": 2})
    started = {f"e-{i}": 101.0 + i * 0.1 for i in range(8)}
    sent.acked = dict.fromkeys(started, sent.ended)
    row = throughput_row("t", 10, sent, started, None)
    assert not any(n.startswith("FAILED") for n in row.notes) and any("only 8/10" in n for n in row.notes)


def test_latency_row_from_ack_to_start() -> None:
    acked = {f"e-{i}": 10.0 for i in range(100)}
    started = {f"e-{i}": 10.0 + (i + 1) / 100 for i in range(100)}  # 10 ms .. 1000 ms
    sent = Sent(began=9.0, ended=11.0, acked=acked, refused={"503 overloaded": 2})
    row = latency_row("l", 20.0, sent, started, Row("ceiling", 40.0))
    assert row.p50 == pytest.approx(0.5) and row.p99 == pytest.approx(0.99)
    assert row.ratio == pytest.approx(0.5)
    assert "100/102 started" in "; ".join(row.notes) and "503 overloaded: 2" in "; ".join(row.notes)


def test_bridge_config_leaves_start_mode_out_for_the_default() -> None:
    cfg = bridge_config(project="p", address="a:1", mode=None, targets={"tput": "q"})
    assert "start_mode" not in cfg["dispatcher"]
    assert bridge_config(project="p", address="a:1", mode="child", targets={})["dispatcher"]["start_mode"] == "child"
    target = {"id": "tput", "workflow_type": "Noop", "task_queue": "q", "triggers": [{"name": "tput"}]}
    assert cfg["workflows"] == [target]


def test_bridge_config_is_valid() -> None:
    from bridge.config import parse_config

    cfg = bridge_config(
        project="bench-x",
        address="127.0.0.1:7233",
        mode="activity",
        targets={"warm": "q1", "tput": "q2"},
        shards=2,
        kafka=[{"bootstrap_servers": "k:9092", "topics": ["t"], "event": {"format": "envelope"}}],
    )
    parsed = parse_config(cfg)
    assert parsed.dispatcher.shards == 2 and parsed.dispatcher.start_mode == "activity"


def test_wrk_script_defines_the_hooks_the_bench_relies_on() -> None:
    text = (Path(__file__).parents[2] / "bench" / "events.lua").read_text()
    hooks = ("setup", "init", "delay", "request", "response", "done")
    for hook in (f"function {name}(" for name in hooks):
        assert hook in text
    assert "Idempotency-Key" in text


def test_a_latency_row_counts_an_event_that_never_started_as_endless() -> None:
    """The percentiles were taken over the events that started: losing the slowest tenth left a
    p99 that looked better than before the loss."""
    acked = {f"e-{i}": 10.0 for i in range(100)}
    started = {f"e-{i}": 10.0 + (i + 1) / 100 for i in range(98)}  # two never start
    row = latency_row("l", 20.0, Sent(began=9.0, ended=11.0, acked=acked), started, None)
    assert row.p50 == pytest.approx(0.5) and row.p99 == math.inf
    assert "FAILED: 2 acknowledged events started no run" in row.notes


def test_a_throughput_row_is_timed_to_when_temporal_confirmed_its_last_start() -> None:
    """A run's start time is stamped when its start arrives, before it is written; the ceiling is
    timed to its calls' answers. The row ends when the last start was confirmed, if later."""
    sent = Sent(began=100.0, ended=102.0, acked={f"e-{i}": 101.0 for i in range(10)})
    started = {f"e-{i}": 100.5 + i * 0.5 for i in range(10)}  # the last stamped at 105.0
    assert throughput_row("t", 10, sent, started, None, confirmed=110.0).rate == pytest.approx(1.0)
    assert throughput_row("t", 10, sent, started, None, confirmed=104.0).rate == pytest.approx(2.0)
