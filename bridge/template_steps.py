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

Sizes are items for lists, tuples, dicts and sets (ITEMS_PER_STEP a step, SEARCH_ITEMS_PER_STEP
for ``in``), and characters for text (CHARS_PER_STEP read or made by a filter or method,
COPY_CHARS_PER_STEP made by an operator or written out, HEAVY_CHARS_PER_STEP read by the HEAVY
filters). A filter or method whose arguments can make its result far larger than its input
(``replace``, ``center``, ``join``, ``batch``'s and ``slice``'s fill, …) is charged what it would make
before it makes it. Past MAX_STEPS the rendering fails with a SecurityError that says so; no text
over MAX_TEXT is made or written.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import nodes, pass_environment
from jinja2.exceptions import SecurityError
from jinja2.filters import ignore_case, make_attrgetter
from jinja2.runtime import LoopContext

MAX_STEPS = 100_000
"""Steps one rendering may take. Loops over an event's lists, one inside another, cost their
product: two lists of 250,000 items each, from one event of 1 MiB, would have held the
dispatcher's workflow task for hours. On a 2-core machine 100,000 steps took 13 ms in a plain loop,
0.22 s in one that reads ``loop.last``, 75 ms of calls to a macro."""
CALL_STEPS = 4
CHARS_PER_STEP = 512  # of text a filter or a method reads or makes
COPY_CHARS_PER_STEP = 8192  # of text an operator (``~``, ``+``, ``%``) makes, or the rendering writes out
HEAVY_CHARS_PER_STEP = 8  # of text the filters that work word by word read (HEAVY): wordwrap took 0.7 s a MB
ITEMS_PER_STEP = 8  # of the items a filter or a comparison reads, or a value made holds (C loops)
SEARCH_ITEMS_PER_STEP = 32  # of the items ``in`` looks through (one C comparison each)
HEAVY = frozenset({"wordwrap", "striptags", "title", "wordcount", "indent", "center"})
FOLDED = frozenset({"sort", "unique", "min", "max", "dictsort", "groupby"})
"""Filters that fold the case of every text item they read: charged the items' text too."""
MAX_TEXT = 8 * 1024 * 1024
"""Characters one value a template makes may hold, and all it writes out: past them it fails (the
dispatcher's argument for a run is 1.9 MB at most; a value the size of memory is no template's)."""
DROPPED = ("pprint", "urlize")
"""Filters a counted rendering refuses: ``urlize`` takes time quadratic in runs of punctuation (200
KB of it ran past a minute), ``pprint`` seconds on deeply nested values, whatever the steps."""

# The filters the AST transform puts in; they are not charged as filters a template names.
LOOP_FILTER = "signal_bridge_loop"  # what every ``for`` loop iterates through
MADE_FILTER = "signal_bridge_made"  # around every ``~`` and slice: charges what it made
SEARCHED_FILTER = "signal_bridge_searched"  # around the items of every ``in``: charges the search
COMPARED_FILTER = "signal_bridge_compared"  # around the right side of every other comparison
WRITTEN_FILTER = "signal_bridge_written"  # around every expression written (the output, a block's)

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
    """One rendering's steps, against its limit. Text is counted in characters as it comes, so
    that many small pieces cost what one large one does."""

    limit: int | None
    taken: int = 0
    chars: int = 0  # text charged, in 1/COPY_CHARS_PER_STEP steps not yet taken
    items: int = 0  # items charged, in 1/SEARCH_ITEMS_PER_STEP steps not yet taken
    written: int = 0  # characters written out
    expressed: int = 0  # characters of text expressions wrote, into the output or a block

    def take(self, steps: int = 1) -> None:
        self.taken += steps
        if self.limit is not None and self.taken > self.limit:
            raise SecurityError(
                f"it took more than {self.limit:,} steps (loop iterations, calls, and the sizes of the values it "
                "read, made and wrote)"
            )

    def text(self, chars: int, per_step: int = CHARS_PER_STEP) -> None:
        self.chars += chars * (COPY_CHARS_PER_STEP // per_step)
        if (whole := self.chars // COPY_CHARS_PER_STEP) > 0:
            self.chars -= whole * COPY_CHARS_PER_STEP
            self.take(whole)

    def read(
        self, value: Any, per_step: int = CHARS_PER_STEP, folded: bool = False, items: int = ITEMS_PER_STEP
    ) -> None:
        """``value`` read through: its items (``items`` a step), or its text (``per_step`` characters)."""
        if isinstance(value, str | bytes | bytearray):
            self.text(len(value), per_step)
        elif isinstance(value, list | tuple | dict | set | frozenset | range):
            self.items += (len(value) + 1) * (SEARCH_ITEMS_PER_STEP // items)
            if (whole := self.items // SEARCH_ITEMS_PER_STEP) > 0:
                self.items -= whole * SEARCH_ITEMS_PER_STEP
                self.take(whole)
            if folded and not isinstance(value, range):
                self.text(sum(len(v) for v in value if isinstance(v, str)), per_step)

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
    """Run one rendering, its steps counted (and added to the :func:`metered` around it). Inside
    ``metered(None)`` nothing is counted or bounded: a workflow's run begun before the limit renders
    as Jinja did then, filter for filter, so that its history replays alike."""
    meter = _METER.get()
    limit = MAX_STEPS if meter is None else meter.limit
    if meter is not None and meter.total is not None:
        left = max(0, meter.total - meter.steps)
        limit = left if limit is None else min(limit, left)
    if limit is None:
        token = _COUNT.set(None)
        try:
            return render()
        finally:
            _COUNT.reset(token)
    count = _Count(limit)
    token = _COUNT.set(count)
    try:
        return render()
    finally:
        _COUNT.reset(token)
        if meter is not None:
            meter.steps += count.taken


def made(value: T, per_step: int = CHARS_PER_STEP) -> T:
    """A value just made (a filter's, a method's or an operator's): its size is charged (text at
    ``per_step`` characters a step, and MAX_TEXT at most), and an iterator's items as they are
    taken."""
    count = _COUNT.get()
    if count is None:
        return value
    if isinstance(value, Iterator):
        return count.iterate(value)  # type: ignore[return-value]
    if isinstance(value, str | bytes | bytearray) and len(value) > MAX_TEXT:
        raise SecurityError(f"it made a text of {len(value):,} characters (at most {MAX_TEXT:,})")
    if not isinstance(value, range):  # lazy: charged as it is iterated or searched
        count.read(value, per_step)
    return value


def copied(value: T) -> T:
    """A value an operator made or a block wrote: text copied, not read through."""
    return made(value, COPY_CHARS_PER_STEP)


def written(chunks: Iterable[str]) -> Iterator[str]:
    """What a rendering writes out, charged as it goes: MAX_TEXT characters at most."""
    for chunk in chunks:
        if (count := _COUNT.get()) is not None:
            count.written += len(chunk)
            if count.written > MAX_TEXT:
                raise SecurityError(f"it wrote more than {MAX_TEXT:,} characters")
            count.text(len(chunk), COPY_CHARS_PER_STEP)
        yield chunk


def _expression_written(value: T) -> T:
    """What an expression writes, into the output or into a ``{% set %}`` or ``{% filter %}``
    block (which the final output never sees): MAX_TEXT characters at most, all together."""
    if isinstance(value, str) and (count := _COUNT.get()) is not None:
        count.expressed += len(value)
        if count.expressed > MAX_TEXT:
            raise SecurityError(f"it wrote more than {MAX_TEXT:,} characters")
    return copied(value)


def searched(items: Any) -> Any:
    """What ``in`` reads through: a list, a text, a mapping's values (a mapping, a set or a mapping's
    keys is looked up). A range is looked up for an integer and read through for anything else."""
    if (count := _COUNT.get()) is not None:
        count.take()
        if isinstance(items, range):
            return _Range(items)
        if isinstance(items, str | bytes | list | tuple):
            count.read(items, items=SEARCH_ITEMS_PER_STEP)
        elif isinstance(items, Sized) and not isinstance(items, Mapping | AbstractSet):
            count.read(range(len(items)), items=SEARCH_ITEMS_PER_STEP)  # its length is what counts
    return items


class _Range:
    """A range ``in`` looks through: at once for an integer, item by item (charged) otherwise."""

    def __init__(self, items: range) -> None:
        self.items = items

    def __contains__(self, value: Any) -> bool:
        if not (isinstance(value, int) and not isinstance(value, bool)) and (count := _COUNT.get()) is not None:
            count.read(self.items, items=SEARCH_ITEMS_PER_STEP)
        return value in self.items


def compared(value: T) -> T:
    """One side of ``==``, ``<``, …: a list, a mapping or a text is read through."""
    if (count := _COUNT.get()) is not None and isinstance(value, str | bytes | list | tuple | dict):
        count.read(value)
    return value


_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?(#?)0?(\d*)[,_]?(?:\.(\d*))?[,_]?(.?)", re.DOTALL)
"""A format spec of ``str.format``: its ``#``, width, precision and type."""
PRINTF_PADDED = frozenset("diouxXeEfF")
"""``%`` types whose result has at least its precision's characters (``g`` drops the zeros but for
``#``, ``s`` and the others cut to it)."""
SPEC_PADDED = frozenset("eEfF%")
KEPT_ZEROS = frozenset("gGn")  # with ``#``, their zeros are kept: the precision's characters too


def _size(digits: str) -> int:
    """The number ``digits`` are (leading zeros are no more characters), past MAX_TEXT as MAX_TEXT + 1."""
    digits = digits.lstrip("0")
    return int(digits or "0") if len(digits) <= 9 else MAX_TEXT + 1


def _asked(total: int, width: int, precision: int, value: Any, text: str) -> int:
    """``total`` and what one field asks for: its width, or its precision where the value's digits
    fill it (a float that is no number, ``inf`` or ``nan``, ignores it), refused past MAX_TEXT."""
    if isinstance(value, float) and not math.isfinite(value):
        precision = 0
    total += max(width, precision)
    if total > MAX_TEXT:
        raise SecurityError(
            f"{text} asks for {total:,} characters or more, more than a template may make ({MAX_TEXT:,})"
        )
    return total


def _printf_number(form: str, at: int) -> tuple[str, int]:
    """The width or precision at ``form[at:]`` (``*``, digits, or none) and where it ends."""
    if form.startswith("*", at):
        return "*", at + 1
    end = at
    while end < len(form) and form[end].isdigit():
        end += 1
    return form[at:end], end


def _printf_conversions(form: str) -> Iterator[tuple[str | None, str, str, str | None, str]]:
    """Each conversion of a ``%`` format as CPython reads it: key, flags, width, precision, type."""
    at = form.find("%")
    while at >= 0:
        at += 1
        key = None
        if form.startswith("(", at):  # a mapping key: parentheses inside it nest
            depth, at = 1, at + 1
            begun = at
            while at < len(form) and depth:
                depth += {"(": 1, ")": -1}.get(form[at], 0)
                at += 1
            key = form[begun : at - 1]
        flags = at
        while at < len(form) and form[at] in "-+ #0":
            at += 1
        flags_text = form[flags:at]
        width, at = _printf_number(form, at)
        precision = None
        if form.startswith(".", at):
            precision, at = _printf_number(form, at + 1)
        while at < len(form) and form[at] in "hlL":
            at += 1
        if at >= len(form):
            return
        yield key, flags_text, width, precision, form[at]
        at = form.find("%", at + 1)


def printf_asked(form: Any, args: Any) -> None:
    """Refuse ``form % args`` before it is made when its widths and precisions (in ``form``, or
    given with ``*``) ask for more than MAX_TEXT characters together: the text was refused only
    once made, after up to 570 MB of it. Nothing is charged, so a rendering that makes it counts as
    before, and one refused here made more than MAX_TEXT before, and was refused then."""
    if _COUNT.get() is None or not isinstance(form, str) or "%" not in form:
        return
    given = args if isinstance(args, tuple) else (args,)
    at = total = 0
    for key, flags, width, precision, kind in _printf_conversions(form):
        if kind == "%":
            continue
        asked = []
        for part, negative_is in ((width, abs), (precision, lambda n: max(n, 0))):
            if part == "*":  # a negative width left-justifies; a negative precision is none
                value = given[at] if at < len(given) else 0
                at += 1
                asked.append(negative_is(value) if isinstance(value, int) else 0)
            else:
                asked.append(_size(part) if part else 0)
        if key is not None:
            value = args.get(key) if isinstance(args, Mapping) else None
        else:
            value = given[at] if at < len(given) else None
            at += 1
        padded = kind in PRINTF_PADDED or ("#" in flags and kind in KEPT_ZEROS)
        total = _asked(total, asked[0], asked[1] if padded else 0, value, "a % format")


def spec_asked(spec: str, value: Any, total: int) -> int:
    """:func:`printf_asked` for one field of ``str.format``, its nested fields filled in: ``total``
    with what it asks for (``total``: what the fields before it in the format asked for)."""
    match = _SPEC.match(spec) if _COUNT.get() is not None else None
    if match is None:
        return total
    alternate, width, precision, kind = match.groups()
    padded = kind in SPEC_PADDED or (alternate == "#" and (kind in KEPT_ZEROS or not kind))
    return _asked(
        total, _size(width) if width else 0, _size(precision) if precision and padded else 0, value, "a format"
    )


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
        if isinstance(sep, str) and isinstance(items, list | tuple):
            texts = sum(len(i) for i in items if isinstance(i, str))  # a list repeated by * holds them many times
            return _text_steps(len(items) * len(sep) + texts)
    if name in ("strip", "lstrip", "rstrip", "trim") and isinstance(value, str):
        chars = arg if isinstance(arg, str) else kwargs.get("chars")
        return _text_steps(len(value) * len(chars)) if isinstance(chars, str) else 0
    if name == "format" and isinstance(value, str) and "*" in value:  # a width or precision given with it
        return _text_steps(max([a for a in args if isinstance(a, int)] or [0]))
    if name in ("batch", "slice") and isinstance(arg, int):
        return arg
    if name == "wordwrap" and isinstance(value, str):
        wrap = kwargs.get("wrapstring", args[3] if len(args) > 3 else None)
        return _text_steps(len(value) * (1 + len(wrap))) if isinstance(wrap, str) else 0
    return 0


READ_NONE = frozenset(
    {"length", "count", "first", "last", "default", "d", "attr", "int", "float", "abs", "round", "truncate"}
)
"""Filters that read none of their input's items (or one, or the few characters they keep) and give
back a value that was there or a small one."""


def charged_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, a filter, charged a step, the input it reads, what its arguments would make
    it make (:func:`amplified`), and what it made. Jinja passes a context or an environment first
    to some filters."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
    reads = name not in READ_NONE

    per_step = HEAVY_CHARS_PER_STEP if name in HEAVY else CHARS_PER_STEP
    folded = name in FOLDED

    @functools.wraps(function)
    def charged(*args: Any, **kwargs: Any) -> Any:
        count = _COUNT.get()
        if count is None:
            return function(*args, **kwargs)
        given = args[skip:]
        value, rest = (given[0], given[1:]) if given else (None, ())
        count.take(1 + amplified(name, value, rest, kwargs))
        if reads:
            count.read(value, per_step, folded)
        if name == "format":  # Jinja formats the text of whatever it is given
            printf_asked(value if isinstance(value, str) else str(value), kwargs or tuple(rest))
        result = function(*args, **kwargs)
        return made(result) if reads else result

    return charged


def charged_test(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, a test (``is …``, and ``select``'s), charged a step, and ``in``'s the items
    it looks through."""
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def charged(*args: Any, **kwargs: Any) -> Any:
        if (count := _COUNT.get()) is not None:
            count.take()
            given = args[skip:]
            if name == "in" and len(given) > 1:
                searched(given[1])
            elif len(given) > 1:
                compared(given[1])
        return function(*args, **kwargs)

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
        count.read(owner)
        count.take(amplified(getattr(target, "__name__", ""), owner, args, kwargs, method=True))
    if isinstance(target, LoopContext) and args:
        return (count.iterate(args[0]), *args[1:])
    return args


def count_steps(tree: nodes.Template) -> nodes.Template:
    """Put the counting filters in: every ``for`` loop iterates through LOOP_FILTER, every ``~``
    and every expression written (into the output or a ``{% set %}`` block) is charged what it
    made, the items of every ``in`` what the search reads, and a comparison what it reads."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None)
    _wrap_made(tree)
    for output in tree.find_all(nodes.Output):
        output.nodes = [
            n if isinstance(n, nodes.TemplateData) else nodes.Filter(n, WRITTEN_FILTER, [], [], None, None)
            for n in output.nodes
        ]
    for compare in tree.find_all(nodes.Compare):
        for operand in compare.ops:
            wrap = SEARCHED_FILTER if operand.op in ("in", "notin") else COMPARED_FILTER
            operand.expr = nodes.Filter(operand.expr, wrap, [], [], None, None)
    return tree


def _makes(node: nodes.Node) -> bool:
    """A ``~`` (Concat), or a slice ``x[a:b]`` (Jinja compiles it to a plain subscript, past the
    environment's getitem): each makes a new value."""
    return isinstance(node, nodes.Concat) or (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice))


def _wrap_made(node: nodes.Node) -> None:
    """Each node that makes a value (:func:`_makes`) inside a filter that charges it, innermost first."""
    for field, value in node.iter_fields():
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, nodes.Node):
                    _wrap_made(item)
                    if _makes(item):
                        value[i] = nodes.Filter(item, MADE_FILTER, [], [], None, None)
        elif isinstance(value, nodes.Node):
            _wrap_made(value)
            if _makes(value):
                setattr(node, field, nodes.Filter(value, MADE_FILTER, [], [], None, None))


def install(filters: dict[str, Any], tests: dict[str, Any]) -> None:
    """Charge every filter and test of an environment (less DROPPED), and add the filters the AST
    transform puts in."""
    for name in DROPPED:
        filters[name] = _refused(name, filters[name])
    filters["sum"] = _linear_sum(filters["sum"])
    filters["unique"] = _unique_of(filters["unique"])
    for name, function in list(filters.items()):
        filters[name] = charged_filter(name, function)
    for name, function in list(tests.items()):
        tests[name] = charged_test(name, function)
    filters[LOOP_FILTER] = lambda items: _loop(items)
    filters[MADE_FILTER] = lambda value: copied(value)
    filters[SEARCHED_FILTER] = lambda items: searched(items)
    filters[COMPARED_FILTER] = lambda value: compared(value)
    filters[WRITTEN_FILTER] = lambda value: _expression_written(value)


def _loop(items: Iterable[T]) -> Iterable[T]:
    count = _COUNT.get()
    return items if count is None else count.iterate(items)


def _linear_sum(function: Callable[..., Any]) -> Callable[..., Any]:
    """``sum``, with lists added up (``sum(start=[])``, the usual flattening) in linear time: Python's
    copies the sum so far at each item, 2,000 one-item lists cost 2,000,000 copies."""

    @functools.wraps(function)
    def linear(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        if not isinstance(start, list | tuple) or _COUNT.get() is None:
            return function(environment, iterable, attribute, start)
        getter = make_attrgetter(environment, attribute) if attribute is not None else None
        total = list(start)
        for item in iterable:
            part = getter(item) if getter is not None else item
            if not isinstance(part, list | tuple):
                raise TypeError(f"can only add a list to a list, not {type(part).__name__}")
            total.extend(part)
            if (count := _COUNT.get()) is not None:
                count.read(part)
        return total if isinstance(start, list) else tuple(total)

    return linear


def _unique_of(function: Callable[..., Any]) -> Callable[..., Any]:
    """Jinja's ``unique`` (``function``) while nothing is counted, else :func:`_unique`."""

    @pass_environment
    def unique(environment: Any, value: Any, case_sensitive: bool = False, attribute: Any = None) -> Any:
        if _COUNT.get() is None:
            return function(environment, value, case_sensitive, attribute)
        return _unique(environment, value, case_sensitive, attribute)

    return unique


def _unique(
    environment: Any, value: Iterable[Any], case_sensitive: bool = False, attribute: Any = None
) -> Iterator[Any]:
    """Jinja's ``unique``, keyed so that numbers an event chooses cannot collide: Python hashes
    integers by their value modulo 2**61 - 1, and 40,000 multiples of it took 19 s in a set."""
    getter = make_attrgetter(environment, attribute, postprocess=None if case_sensitive else ignore_case)
    seen = set()
    for item in value:
        key = getter(item)
        if isinstance(key, int | float) and not isinstance(key, bool):
            key = ("number", repr(key))
        if key not in seen:
            seen.add(key)
            yield item


def safe_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The ``dict`` global, with text keys only, checked before any is hashed: integer keys an
    event chooses can all hash alike (30,000 pairs took 5 s)."""
    if _COUNT.get() is None:  # nothing counted: as Jinja's own (a run begun before the limit)
        return dict(*args, **kwargs)
    pairs: list[tuple[Any, Any]] = []
    if args:
        source = args[0]
        for pair in source.items() if isinstance(source, Mapping) else source:
            key, value = pair
            if not isinstance(key, str):
                raise SecurityError("dict() takes text keys only")
            pairs.append((key, value))
    return dict(pairs, **kwargs)


def _refused(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A DROPPED filter: it fails with an error naming it while steps are counted (it is kept for
    the renderings nothing counts, of runs begun before the limit)."""

    @functools.wraps(function)
    def refused(*args: Any, **kwargs: Any) -> Any:
        if _COUNT.get() is not None:
            raise SecurityError(f"the {name} filter is not available: its time grows with the event whatever the steps")
        return function(*args, **kwargs)

    return refused
