"""``signal-bridge replay kafka|amqp|runs``: send refused or past events through the pipeline again.

- ``kafka`` / ``amqp`` read a dead-letter topic or queue and settle each letter through the
  adapter's own settle path with the original event id and source (:mod:`adapters.kafka_replay`,
  :mod:`adapters.amqp_replay`): once the config routes them, each event starts its runs once,
  and a second replay starts nothing new (same ids, same run ids).
- ``runs`` (:mod:`bridge.runtime.replay_runs`) sends the events found in past target runs' inputs
  again as new events, ``replay:{n}:{original id}``.

This module is the command: the CLI (:mod:`bridge.runtime.cli`) parses the arguments and loads the
config, this one connects (:mod:`bridge.runtime.replay_support`: not in a dry run), runs the
replay with a progress bar on a terminal and prints the summary. docs/replay.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO

from temporalio.client import Client

from adapters.amqp_replay import AmqpReplay
from adapters.kafka_replay import KafkaReplay
from adapters.replay_common import Tally
from bridge.errors import BridgeError
from bridge.pipeline import Pipeline
from bridge.runtime.progress import ProgressBar
from bridge.runtime.replay_runs import ask, replay_runs
from bridge.runtime.replay_support import GIVE_UP_AFTER, Outcome, bar_updater, finish, printer, session
from bridge.settle import Abandoned
from bridge.snapshot import Snapshot

__all__ = ["Outcome", "main", "replay_amqp", "replay_group", "replay_kafka", "replay_runs", "summary"]


def replay_group(snapshot: Snapshot) -> str:
    """The consumer group a Kafka replay commits in, unless ``--group`` names another."""
    return f"signal-bridge-replay-{snapshot.config.slug}"


class _Replay(Protocol):
    @property
    def tally(self) -> Tally: ...

    @property
    def stopped(self) -> str | None: ...

    async def run(self) -> Tally: ...


@dataclass(frozen=True)
class _Words:
    """What a replay says of the letters it could not settle, per transport; ``{where}`` is the
    topic or queue."""

    abandoned: str  # what happens to the batch in hand when Temporal stays away
    refused: str  # where still-refused letters went
    kept: str  # where letters that cannot be replayed went


KAFKA_WORDS = _Words(
    "the batch in hand is not committed",
    "still refused letters were written again to {where} with the new reason",
    "letters that cannot be replayed were written again to {where} as they were",
)
AMQP_WORDS = _Words(
    "the batch in hand is left unacked",
    "still refused messages were published again to {where} with the new reason",
    "messages that cannot be replayed were put back in {where} where they were",
)


async def _replay(
    snapshot: Snapshot,
    outcome: Outcome,
    build: Callable[[Pipeline], _Replay],
    words: _Words,
    *,
    where: str,
    client: Client | None,
    bar: ProgressBar,
) -> Outcome:
    """Run the replay ``build`` makes in a session (connected unless a dry run) and fill ``outcome``."""
    async with session(snapshot, dry_run=outcome.dry_run, client=client) as s:
        replay = build(s.pipeline)
        outcome.tally = replay.tally
        try:
            with bar.around_logging():
                await replay.run()
            if replay.stopped:
                outcome.stopped = f"{replay.stopped}: run the replay again later"
        except Abandoned as exc:
            outcome.stopped = f"{exc}; {words.abandoned}: run the replay again later"
        outcome.existing = s.sink.existing if s.sink else None
    finish(bar, outcome.tally)
    if not outcome.dry_run and outcome.tally.refused:
        outcome.notes.append(words.refused.format(where=where))
    if not outcome.dry_run and outcome.tally.kept:
        outcome.notes.append(words.kept.format(where=where))
    return outcome


async def replay_kafka(
    snapshot: Snapshot,
    *,
    topic: str,
    group: str | None = None,
    bootstrap_servers: str | None = None,
    dry_run: bool = False,
    batch: int = 500,
    give_up_after: float = GIVE_UP_AFTER,
    client: Client | None = None,
    bar: ProgressBar | None = None,
    out: TextIO | None = None,
) -> Outcome:
    """Replay the dead letters of ``topic`` (see :mod:`adapters.kafka_replay`)."""
    cfg = snapshot.config
    if not cfg.kafka:
        raise BridgeError("the config has no kafka: entry, so no dead letter of Kafka can be replayed")
    if readers := [",".join(e.topics) for e in cfg.kafka if topic in e.topics]:
        raise BridgeError(
            f"topic {topic} is not a dead-letter topic: the kafka entry for {readers[0]} reads it, and a replay "
            "would write its records back to it (each record without an id of its own would start again)"
        )
    source = next((e for e in cfg.kafka if e.dead_letter_topic == topic), cfg.kafka[0])
    group_id = group or replay_group(snapshot)
    bar = bar or ProgressBar("replay", enabled=False)

    def build(pipeline: Pipeline) -> KafkaReplay:
        return KafkaReplay(
            cfg.kafka,
            pipeline,
            topic=topic,
            group_id=group_id,
            bootstrap_servers=bootstrap_servers or source.bootstrap_servers,
            security=source.security,
            batch=batch,
            dry_run=dry_run,
            give_up_after=give_up_after,
            progress=bar_updater(bar, "letters"),
            report=printer(out, bar),
        )

    outcome = Outcome(f"kafka topic {topic} (group {group_id})", dry_run, Tally())
    return await _replay(snapshot, outcome, build, KAFKA_WORDS, where=topic, client=client, bar=bar)


async def replay_amqp(
    snapshot: Snapshot,
    *,
    queue: str,
    url: str | None = None,
    dry_run: bool = False,
    batch: int = 200,
    give_up_after: float = GIVE_UP_AFTER,
    client: Client | None = None,
    bar: ProgressBar | None = None,
    out: TextIO | None = None,
) -> Outcome:
    """Replay the dead letters in ``queue`` (see :mod:`adapters.amqp_replay`)."""
    cfg = snapshot.config
    if not cfg.amqp:
        raise BridgeError("the config has no amqp: entry, so no dead letter of RabbitMQ can be replayed")
    if any(e.queue == queue for e in cfg.amqp):
        raise BridgeError(f"queue {queue} is not a dead-letter queue: an amqp entry consumes it")
    bar = bar or ProgressBar("replay", enabled=False)

    def build(pipeline: Pipeline) -> AmqpReplay:
        return AmqpReplay(
            cfg.amqp,
            pipeline,
            queue=queue,
            url=url or cfg.amqp[0].url,
            batch=batch,
            dry_run=dry_run,
            give_up_after=give_up_after,
            progress=bar_updater(bar, "letters"),
            report=printer(out, bar),
        )

    outcome = Outcome(f"amqp queue {queue}", dry_run, Tally())
    return await _replay(snapshot, outcome, build, AMQP_WORDS, where=queue, client=client, bar=bar)


# --- the summary ------------------------------------------------------------------------------------


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items()))


def summary(outcome: Outcome) -> list[str]:
    """The lines the command ends with."""
    t = outcome.tally
    runs = outcome.kind == "runs"
    title = f"replay of {outcome.what}"
    if runs:
        title += f", replay number {outcome.number}"
    if outcome.dry_run:
        title += " (dry run: nothing was submitted, committed, acked or written)"
    lines = [title]
    if runs:
        lines.append(f"  runs read: {t.read}; distinct events: {t.total}")
    else:
        lines.append(f"  letters read: {t.read}" + (f" of {t.total}" if t.total not in (None, t.read) else ""))
    lines.append(f"  {'would be ' if outcome.dry_run else ''}accepted: {t.accepted}")
    refused = sum(t.refused.values())
    lines.append(f"  still refused: {refused}" + (f" ({_counts(t.refused)})" if refused else ""))
    kept = sum(t.kept.values())
    if kept:
        lines.append(f"  {'not replayed' if runs else 'not replayable, kept'}: {kept} ({_counts(t.kept)})")
    if runs:
        lines.append(f"  duplicates: {t.duplicates} run(s) carried an event another run carried (sent once)")
    else:
        lines.append(f"  duplicates: {t.duplicates} letter(s) carried an event an earlier letter carried")
    e = outcome.existing
    if e is not None and e.events:
        lines.append(
            f"  runs: {e.new_runs} new, {e.existing_runs} existed already; {e.duplicates} event(s) "
            "started nothing new (every run they name existed)"
            + (f"; {e.unknown} lookup(s) unanswered" if e.unknown else "")
        )
    if t.changed_ids:
        lines.append(f"  warning: {t.changed_ids} event id(s) differ from their letter's x-event-id (see the log)")
    lines.extend(f"  {note}" for note in outcome.notes)
    if outcome.stopped:
        lines.append(f"  stopped early: {outcome.stopped}")
    return lines


# --- the command ----------------------------------------------------------------------------------


def main(args: argparse.Namespace, snapshot: Snapshot) -> int:
    """Run the replay ``args`` describe (parsed by the CLI): 0 when it got to the end, 1 when it
    stopped early (Temporal refused for ``--give-up-after`` seconds, or not confirmed)."""
    return asyncio.run(_main(args, snapshot))


async def _main(args: argparse.Namespace, snapshot: Snapshot) -> int:
    bar = ProgressBar(f"replay {args.replay}")
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.replay == "kafka":
        outcome = await replay_kafka(
            snapshot,
            topic=args.topic,
            group=args.group,
            bootstrap_servers=args.bootstrap_servers,
            dry_run=args.dry_run,
            batch=args.batch,
            give_up_after=args.give_up_after,
            bar=bar,
        )
    elif args.replay == "amqp":
        outcome = await replay_amqp(
            snapshot,
            queue=args.queue,
            url=args.url,
            dry_run=args.dry_run,
            batch=args.batch,
            give_up_after=args.give_up_after,
            bar=bar,
        )
    else:
        outcome = await replay_runs(
            snapshot,
            query=args.query,
            to=args.to,
            number=args.replay_number,
            dry_run=args.dry_run,
            confirm=None if args.yes else ask,
            give_up_after=args.give_up_after,
            bar=bar,
        )
    print("\n".join(summary(outcome)))
    return 0 if outcome.ok else 1
