"""The bench's wrk closed loop against the bare endpoint: exactly its quota of requests, counted."""

from __future__ import annotations

from pathlib import Path

from bench.load import wrk_closed_loop
from bench.procs import Bare


async def test_wrk_sends_its_quota_and_counts_the_answers(wrk: str, tmp_path: Path) -> None:
    bare = Bare(tmp_path)
    try:
        await bare.start()
        sent = await wrk_closed_loop([bare.url], "tput", 120, 8, "q", tmp_path, limit=60)
    finally:
        bare.stop()
    assert sent.accepted == 120  # 2 threads x 60, then wrk is interrupted, not waited out
    assert sent.refused == {}
    assert sent.began < sent.ended < sent.began + 30


async def test_wrk_spreads_over_urls_and_rounds_up_to_whole_quotas(wrk: str, tmp_path: Path) -> None:
    bares = [Bare(tmp_path), Bare(tmp_path)]
    try:
        for bare in bares:
            await bare.start()
        sent = await wrk_closed_loop([b.url for b in bares], "tput", 101, 8, "q", tmp_path, limit=60)
    finally:
        for bare in bares:
            bare.stop()
    assert sent.accepted == 102  # one thread per URL, 51 each


async def test_wrk_counts_refusals_by_status(wrk: str, tmp_path: Path) -> None:
    bare = Bare(tmp_path)
    try:
        await bare.start()
        sent = await wrk_closed_loop([bare.url.replace("/events", "/nowhere")], "tput", 10, 2, "q", tmp_path, limit=60)
    finally:
        bare.stop()
    assert sent.accepted == 0 and sent.refused == {"404": 10}
