"""What the dead-letter replays of the queue adapters share (``signal-bridge replay kafka|amqp``).

A replay reads dead letters, rebuilds from each the message it was made of (the original
topic/partition/offset or queue/exchange/routing key travel in its ``x-original-*`` headers), and
hands those to the adapter's own settle path (:class:`bridge.settle.Settler`): the same decode,
check and submit, so each event gets its original id and source, and so the run ids it had. This
module holds the parts that are not a broker's: the :class:`Tally` a replay reports, what makes
a letter impossible to replay (:data:`NOT_REPLAYABLE`), and :func:`inspect` (decode and check,
submit nothing) for ``--dry-run``. The transports are :mod:`adapters.kafka_replay` and
:mod:`adapters.amqp_replay`; the command, its progress and summary :mod:`bridge.runtime.replay`;
what an operator sees of it: docs/replay.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bridge.config import EventFormat
from bridge.deadletter import H_EVENT_ID, H_TRIMMED, MAX_HEADER_VALUE
from bridge.decode import Message, decode
from bridge.errors import EventRejected
from bridge.event import EventSignal
from bridge.logsafe import safe
from bridge.pipeline import Pipeline
from bridge.settle import Disposition, Item

log = logging.getLogger(__name__)

M = TypeVar("M")

REPLAY_ADAPTER = "replay"
"""The ``adapter`` label of what a replay submits (metrics, log lines)."""

# Why a letter cannot be replayed: it is kept as it is (see each transport for where).
NOT_A_DEAD_LETTER = "not_a_dead_letter"  # no x-original-* headers: nothing says where it came from
TRIMMED = "trimmed"  # cut to fit (x-dead-letter-trimmed): what it held is no longer all there
NO_ENTRY = "no_entry"  # no entry of this config reads the topic or queue it came from
# Kafka: the topic holds no record where it says it came from (a partition it lacks, or past its
# end). Anyone who may write to the dead-letter topic could write it, and its offset id would
# make the record that comes to be there later a repeat, never started.
NO_RECORD = "no_record"
NOT_REPLAYABLE = (NOT_A_DEAD_LETTER, TRIMMED, NO_ENTRY, NO_RECORD)


@dataclass
class Tally:
    """What a replay did with the letters it read (or, in a dry run, would do)."""

    read: int = 0
    accepted: int = 0  # Temporal holds their events (acked / committed)
    refused: Counter[str] = field(default_factory=Counter)  # checked again and still refused: reason → count
    kept: Counter[str] = field(default_factory=Counter)  # not replayable, kept as they are: why → count
    duplicates: int = 0  # letters whose event (source, id) an earlier letter of this replay had
    changed_ids: int = 0  # letters whose event id is no longer the one their x-event-id names
    total: int | None = None  # letters there were to read when the replay began, when known
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)

    @property
    def handled(self) -> int:
        return self.accepted + sum(self.refused.values()) + sum(self.kept.values())

    def saw(self, event: EventSignal) -> None:
        key = (event.source, event.id)
        if key in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(key)


Progress = Callable[[Tally], None]
"""Called after each batch, so the command can redraw its progress bar."""

Report = Callable[[str], None]
"""Where a dry run writes one line per letter (what would happen to it)."""


def is_trimmed(headers: Mapping[str, str]) -> bool:
    """A letter that had to be cut to fit: its body or headers are no longer all the original's."""
    return H_TRIMMED in headers


def letter_id(headers: Mapping[str, str]) -> str | None:
    """The event id the letter says its event had (``x-event-id``), unless it was cut to fit."""
    value = headers.get(H_EVENT_ID)
    if value is None or len(value.encode("utf-8", "surrogatepass")) >= MAX_HEADER_VALUE - 4:
        return None
    return value


@dataclass(eq=False)
class Checked(Generic[M]):
    """One letter decoded and checked in a dry run."""

    message: M
    event: EventSignal | None = None
    error: EventRejected | None = None


def inspect(pipeline: Pipeline, to_message: Callable[[M], Message], fmt: EventFormat, message: M) -> Checked[M]:
    """Decode and check one message as :class:`bridge.settle.Settler` would, submitting nothing."""
    out: Checked[M] = Checked(message)
    try:
        out.event = decode(to_message(message), fmt)
        out.error = pipeline.check(out.event)
    except EventRejected as exc:
        out.error = exc
    except Exception as exc:  # as the settle path does: a decoder bug refuses the one message
        out.error = EventRejected("malformed", f"cannot decode: {exc!r}")
    return out


def count_settled(
    tally: Tally, items: Sequence[Item[M]], ids: Callable[[M], str | None], where: Callable[[M], str]
) -> None:
    """Add what :meth:`bridge.settle.Settler.settle` did with a batch to ``tally``."""
    for item in items:
        if item.event is not None:
            tally.saw(item.event)
            note_changed_id(tally, item.event, ids(item.message), where(item.message))
        if item.disposition is Disposition.HELD:
            tally.accepted += 1
        elif item.error is not None and item.disposition is not None:
            tally.refused[item.error.reason] += 1
        # No disposition: the message could no longer be acknowledged (its channel closed): it
        # stays where it was, unacknowledged, and is neither counted as accepted nor as refused.


def count_checked(tally: Tally, checked: Checked[M], original_id: str | None, where: str, report: Report) -> None:
    """Add one dry-run verdict to ``tally``, and say it."""
    event, error = checked.event, checked.error
    if event is not None:
        tally.saw(event)
        note_changed_id(tally, event, original_id, where)
    what = f"id={safe(event.id)} name={safe(event.name)} source={safe(event.source)}" if event else ""
    if error is None:
        tally.accepted += 1
        report(f"would accept  {where} {what}")
    else:
        tally.refused[error.reason] += 1
        report(f"still refused {where} reason={error.reason} {what}: {safe(error.message, 300)}".rstrip())


def note_changed_id(tally: Tally, event: EventSignal, original_id: str | None, where: str) -> None:
    """Count (and log) an event whose id is not the one its letter recorded: the entry's ``event``
    settings (format, ``id_from``) changed since it was refused, so its runs get other ids."""
    if original_id is not None and original_id != event.id:
        tally.changed_ids += 1
        log.warning(
            "replay %s: the event id is now %s, the letter says it was %s (the entry's event settings changed)",
            where,
            safe(event.id),
            safe(original_id),
        )


def kept(tally: Tally, why: str, where: str, report: Report | None) -> None:
    tally.kept[why] += 1
    if report is not None:
        report(f"kept as it is  {where}: not replayable ({why})")
    else:
        log.info("replay %s: not replayable (%s); kept as it is", where, why)
