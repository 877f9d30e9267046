"""The hand-over's share told across processes (dispatcher.told): the header, and what the
worker makes of the shares it was told."""

from __future__ import annotations

import inspect
import json
import math
import sys
import threading
import time

from hypothesis import find, given
from hypothesis import strategies as st
from temporalio.api.common.v1 import Payload

from dispatcher.slots import AWAITED_HOLD, FLOOR
from dispatcher.told import HOLD, MAX_SENDER, SENDERS, Told, header, read


def test_a_header_reads_back_as_its_sender_and_share() -> None:
    assert read(header("4242@ingress-a", 0.25)) == ("4242@ingress-a", 0.25)
    assert read(header("x" * 1000, 0.5)) == ("x" * MAX_SENDER, 0.5)


def payload(data: bytes) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=data)


def test_what_is_not_a_header_is_ignored_and_a_share_is_kept_within_floor_and_one() -> None:
    for data in (
        b"",
        b"not json",
        b"[0.5]",
        b'{"share": 0.5}',
        b'{"from": "a"}',
        b'{"from": 7, "share": 0.5}',
        b'{"from": "a", "share": "0.5"}',
        b'{"from": "a", "share": true}',
        b'{"from": "a", "share": NaN}',
        b'{"from": "a", "share": null}',
        b'{"from": "a", "share": ' + b"9" * 400 + b"}",  # float() overflows; it failed the workflow task
        b'{"from": "' + b"x" * 2000 + b'", "share": 0.5}',  # over MAX_BYTES
    ):
        assert read(payload(data)) is None, data
    assert read(payload(b'{"from": "a", "share": 0}')) == ("a", FLOOR)
    assert read(payload(b'{"from": "a", "share": -3}')) == ("a", FLOOR)
    assert read(payload(b'{"from": "a", "share": 7}')) == ("a", 1.0)
    assert read(payload(b'{"from": "a", "share": Infinity}')) == ("a", 1.0)


def test_a_header_nested_past_the_recursion_limit_is_ignored() -> None:
    """json.loads raises RecursionError, not ValueError, for deep nesting within MAX_BYTES; the
    limit is lowered here because test runners raise it."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)
    try:
        assert read(payload(b"[" * 500)) is None
    finally:
        sys.setrecursionlimit(limit)


# Headers shaped like the ones a worker reads, with any values in them: plain random bytes are
# almost never such a header, so alone they never reach the checks on what is read.
_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80) | st.lists(st.integers())
SHAPED = st.fixed_dictionaries({"from": _VALUES, "share": _VALUES}).map(
    lambda header: json.dumps(header, allow_nan=True).encode()
)


@given(SHAPED | st.binary(max_size=300))
def test_arbitrary_bytes_are_ignored_or_read_as_a_share_within_floor_and_one(data: bytes) -> None:
    heard = read(payload(data))
    if heard is not None:
        sender, share = heard
        assert isinstance(sender, str) and len(sender) <= MAX_SENDER
        assert FLOOR <= share <= 1.0 and not math.isnan(share)


def test_shaped_headers_are_read_by_the_property_above() -> None:
    """The strategy reaches the checks: it makes headers that are read, with a share out of range
    too, not only ones that are ignored."""
    out_of_range = find(SHAPED, lambda data: (heard := read(payload(data))) is not None and heard[1] == FLOOR)
    assert json.loads(out_of_range)["share"] <= FLOOR


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_smallest_share_told_within_hold_counts_and_none_is_whole() -> None:
    clock = Clock()
    told = Told(clock)
    assert told.share() == 1.0
    told.tell("a", 0.5)
    told.tell("b", 0.125)
    assert told.share() == 0.125
    clock.now += HOLD / 2
    told.tell("a", 0.25)  # told again: a's hold begins again
    assert told.share() == 0.125
    told.tell("b", 1.0)  # b's burst is over: its latest share counts, not its smallest
    assert told.share() == 0.25
    clock.now += HOLD * 0.75
    assert told.share() == 0.25  # a was told HOLD * 0.75 ago
    clock.now += HOLD / 2
    assert told.share() == 1.0  # nothing told for longer than HOLD


def test_any_header_told_within_the_awaited_hold_says_clients_wait() -> None:
    """A header comes with every signal clients wait on, whole share or not: the worker's starts
    keep to their window while one came in the last AWAITED_HOLD seconds."""
    clock = Clock()
    told = Told(clock)
    assert not told.waiting()
    told.tell("ingress", 1.0)
    assert told.waiting() and told.share() == 1.0
    clock.now += AWAITED_HOLD * 0.9
    assert told.waiting()
    clock.now += AWAITED_HOLD * 0.2
    assert not told.waiting() and told.share() == 1.0


def test_at_most_senders_are_remembered_the_least_recently_told_go_first() -> None:
    clock = Clock()
    told = Told(clock)
    told.tell("first", FLOOR)
    for i in range(SENDERS - 1):
        told.tell(f"s{i}", 0.5)
    told.tell("first", FLOOR)  # told again: now the latest
    told.tell("one-more", 0.5)  # s0 goes, not first
    assert told.share() == FLOOR
    for i in range(SENDERS):
        told.tell(f"t{i}", 0.5)
    assert told.share() == 0.5  # first went with the others


def test_telling_from_activation_threads_while_the_loop_reads_the_share_raises_nothing() -> None:
    """tell() runs in the workflow activation threads, share() on the event loop: one deleted from
    the dict while the other iterated it ('dictionary changed size during iteration'), failing a
    START_TARGETS attempt or a workflow task."""
    clock = [0.0]
    told = Told(clock=lambda: clock[0])
    errors: list[str] = []
    stop = threading.Event()

    def teller() -> None:
        i = 0
        while not stop.is_set():
            try:
                told.tell(f"s{i % (SENDERS + 8)}", 0.5)  # past SENDERS: tell() evicts too
            except Exception as exc:
                errors.append(repr(exc))
            i += 1
            clock[0] += HOLD / 50  # some go stale, so share() deletes

    def reader() -> None:
        while not stop.is_set():
            try:
                told.share()
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=teller), threading.Thread(target=reader), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
