"""The steps a template may take in one rendering, counted as it renders.

An event's values are a hostile sender's: under loops inside each other, a filter in a loop, a
string built up a piece at a time, a value of one list looked up in another, they cost far more
than their size. So every rendering is held to MAX_STEPS, counted without a clock (the dispatcher
renders in workflow code, where a replay must count alike):

- each iteration of a ``for`` loop is a step, recursive loops' inner levels too;
- each call (a macro's, a method's, a global's) is CALL_STEPS, and a text's or a list's method the
  text or list it reads; each filter a step, and the input it reads (not those that read none of
  it: ``length``, ``first``, ``default``, …);
- a value that is made (``~``, ``+``, ``%``, a filter's or a call's result) costs its size, and so
  does what the rendering writes out;
- ``x in items`` costs the items it looks through (not a mapping's or a set's).

A value handed on (an argument, a mapping looked up) costs nothing: a loop that looks each of its
items up in a large mapping of the event costs its items.

Sizes are items for lists, tuples, dicts and sets, and CHARS_PER_STEP characters for text. A
filter or method whose arguments can make its result far larger than its input (``replace``,
``center``, ``join``'s separator, ``batch``'s and ``slice``'s fill, …) is charged what it would make
before it makes it. Past MAX_STEPS the rendering fails with a SecurityError that says so.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import LoopContext

MAX_STEPS = 100_000
"""Steps one rendering may take. Loops over an event's lists, one inside another, cost their
product: two lists of 250,000 items each, from one event of 1 MiB, would have held the
dispatcher's workflow task for hours. On a 2-core machine 100,000 steps took 13 ms in a plain loop,
0.22 s in one that reads ``loop.last``, 75 ms of calls to a macro."""
CALL_STEPS = 4
CHARS_PER_STEP = 512

# The filters the AST transform puts in; they are not charged as filters a template names.
LOOP_FILTER = "signal_bridge_loop"  # what every ``for`` loop iterates through
MADE_FILTER = "signal_bridge_made"  # around every ``~``: charges what it made
SEARCHED_FILTER = "signal_bridge_searched"  # around the items of every ``in``: charges the search
INTERNAL = frozenset({LOOP_FILTER, MADE_FILTER, SEARCHED_FILTER})

T = TypeVar("T")


@dataclass
class Meter:
    """The steps the renderings inside :func:`metered` took, each held to ``limit`` (None: no
    limit, as a workflow's run begun before the limit renders) and all of them together to
    ``total`` (None: each only to its own)."""

    limit: int | None
    total: int | None = None
    steps: int = 0


@dataclass
class _Count:
    """One rendering's steps, against its limit."""

    limit: int | None
    taken: int = 0

    def take(self, steps: int = 1) -> None:
        self.taken += steps
        if self.limit is not None and self.taken > self.limit:
            raise SecurityError(
                f"it took more than {self.limit:,} steps (loop iterations, calls, and the sizes of the values it "
                "made and wrote)"
            )

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            self.take()
            yield item


_METER: ContextVar[Meter | None] = ContextVar("signal_bridge_template_meter", default=None)
_COUNT: ContextVar[_Count | None] = ContextVar("signal_bridge_template_count", default=None)


@contextlib.contextmanager
def metered(limit: int | None = MAX_STEPS, total: int | None = None) -> Iterator[Meter]:
    """Count the steps of every rendering inside, each held to ``limit`` and all together to
    ``total`` (outside, each is held to MAX_STEPS): what a workflow adds to its task's work."""
    meter = Meter(limit, total)
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def counting(render: Callable[[], T]) -> T:
    """Run one rendering, its steps counted (and added to the :func:`metered` around it)."""
    meter = _METER.get()
    limit = MAX_STEPS if meter is None else meter.limit
    if meter is not None and meter.total is not None:
        left = max(0, meter.total - meter.steps)
        limit = left if limit is None else min(limit, left)
    count = _Count(limit)
    token = _COUNT.set(count)
    try:
        return render()
    finally:
        _COUNT.reset(token)
        if meter is not None:
            meter.steps += count.taken


def charge(steps: int) -> None:
    if steps and (count := _COUNT.get()) is not None:
        count.take(steps)


def size(value: Any) -> int:
    """Steps a value weighs: its items, or its characters by CHARS_PER_STEP."""
    if isinstance(value, str | bytes | bytearray):
        return len(value) // CHARS_PER_STEP
    if isinstance(value, list | tuple | dict | set | frozenset | range):
        return len(value)
    return 0


def made(value: T) -> T:
    """A value just made (a filter's, a method's or an operator's): its size is charged, and an
    iterator's items as they are taken."""
    count = _COUNT.get()
    if count is None:
        return value
    if isinstance(value, Iterator):
        return count.iterate(value)  # type: ignore[return-value]
    count.take(size(value))
    return value


def written(chunks: Iterable[str]) -> Iterator[str]:
    """What a rendering writes out, charged as it goes."""
    for chunk in chunks:
        charge(size(chunk))
        yield chunk


def searched(items: T) -> T:
    """The items ``in`` looks through: a list or text is read through, a mapping or set is not."""
    if isinstance(items, str | bytes | list | tuple):
        charge(size(items) or 1)
    return items


def _text_steps(chars: int) -> int:
    return chars // CHARS_PER_STEP


def amplified(name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], method: bool = False) -> int:
    """Steps a filter or a text method (``method``) named ``name`` is about to make, when its
    arguments, not its input, set its result's size; 0 for every other one (its result is charged
    once made). ``value`` is the filter's input, or the text the method is of."""
    arg = args[0] if args else None
    if name == "replace" and isinstance(value, str) and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, str) and isinstance(new, str):
            times = value.count(old) if old else len(value) + 1
            return _text_steps(len(value) + times * len(new))
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(arg, int):
        return _text_steps(arg)
    if name == "expandtabs" and isinstance(value, str):
        tab = arg if isinstance(arg, int) else kwargs.get("tabsize", 8)
        return _text_steps(len(value) + value.count("\t") * tab) if isinstance(tab, int) else 0
    if name == "indent" and isinstance(value, str):
        width = kwargs.get("width", arg if arg is not None else 4)
        wide = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
        return _text_steps(len(value) + (value.count("\n") + 1) * wide)
    if name == "join":  # the filter's separator between its input's items, or a text's between the items given
        sep, items = (value, arg) if method else (kwargs.get("d", arg if arg is not None else ""), value)
        if isinstance(sep, str) and isinstance(items, Sized):
            return _text_steps(len(items) * len(sep))
    if name in ("batch", "slice") and isinstance(arg, int):
        return arg
    if name == "wordwrap" and isinstance(value, str):
        wrap = kwargs.get("wrapstring", args[3] if len(args) > 3 else None)
        return _text_steps(len(value) * (1 + len(wrap))) if isinstance(wrap, str) else 0
    return 0


READ_NONE = frozenset({"length", "count", "first", "last", "default", "d", "attr", "int", "float", "abs", "round"})
"""Filters that read none of their input's items (or one) and give back a value that was there."""


def charged_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, a filter, charged a step, the input it reads, what its arguments would make
    it make (:func:`amplified`), and what it made. Jinja passes a context or an environment first
    to some filters."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
    reads = name not in READ_NONE

    @functools.wraps(function)
    def charged(*args: Any, **kwargs: Any) -> Any:
        count = _COUNT.get()
        if count is None:
            return function(*args, **kwargs)
        given = args[skip:]
        value, rest = (given[0], given[1:]) if given else (None, ())
        count.take(1 + (size(value) if reads else 0) + amplified(name, value, rest, kwargs))
        result = function(*args, **kwargs)
        return made(result) if reads else result

    return charged


def charged_call(target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Charge what a call costs before it is made (CALL_STEPS; a text's or list's method the text
    or list it reads, and what it would make, :func:`amplified`), and give back its arguments: a
    recursive loop's ``loop(items)`` gets its items counted as it iterates them."""
    count = _COUNT.get()
    if count is None:
        return args
    count.take(CALL_STEPS)
    owner = getattr(target, "__self__", None)
    if isinstance(owner, str | bytes | list | tuple):
        count.take(size(owner) + amplified(getattr(target, "__name__", ""), owner, args, kwargs, method=True))
    if isinstance(target, LoopContext) and args:
        return (count.iterate(args[0]), *args[1:])
    return args


def count_steps(tree: nodes.Template) -> nodes.Template:
    """Put the counting filters in: every ``for`` loop iterates through LOOP_FILTER, every ``~``
    is charged what it made, and the items of every ``in`` what the search reads."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None)
    _wrap_made(tree)
    for compare in tree.find_all(nodes.Compare):
        for operand in compare.ops:
            if operand.op in ("in", "notin"):
                operand.expr = nodes.Filter(operand.expr, SEARCHED_FILTER, [], [], None, None)
    return tree


def _wrap_made(node: nodes.Node) -> None:
    """Each ``~`` (a Concat node) inside a filter that charges its result, innermost first."""
    for field, value in node.iter_fields():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, nodes.Node):
                    _wrap_made(item)
                    if isinstance(item, nodes.Concat):
                        value[i] = nodes.Filter(item, MADE_FILTER, [], [], None, None)
        elif isinstance(value, nodes.Node):
            _wrap_made(value)
            if isinstance(value, nodes.Concat):
                setattr(node, field, nodes.Filter(value, MADE_FILTER, [], [], None, None))


def install(filters: dict[str, Callable[..., Any]]) -> None:
    """Charge every filter of an environment, and add the ones the AST transform puts in."""
    for name, function in list(filters.items()):
        filters[name] = charged_filter(name, function)
    filters[LOOP_FILTER] = lambda items: _loop(items)
    filters[MADE_FILTER] = lambda value: made(value)
    filters[SEARCHED_FILTER] = lambda items: searched(items)


def _loop(items: Iterable[T]) -> Iterable[T]:
    count = _COUNT.get()
    return items if count is None else count.iterate(items)
