"""Templates: Jinja2, with the seed's Go-style leading dot accepted (`{{ .trigger.orderId }}`).

A string that is a single ``{{ expression }}`` renders to the expression's value (an object stays
an object); anything else renders to text. :func:`render_url` renders a URL: every expression's
value is percent-encoded as one path segment or query value, so a payload cannot add a ``/``, a
``?``, a ``&`` or a ``..`` segment. Rendering is pure, so the dispatcher may run it in workflow
code.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import quote

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bridge.errors import BridgeError
from bridge.logsafe import safe

MAX_REPEATED = 2 * 1024 * 1024
"""Items of a string or list a template's ``*`` may make: more could never fit a run's argument
(the dispatcher's MAX_TARGET_BYTES), and an event's ``{"qty": "x", "price": 600000000}`` under
``{{ .trigger.qty * .trigger.price }}`` took 5.9 s and 1.8 GB in the dispatcher's workflow task."""
MAX_INT_BITS = 64 * 1024
"""Bits of an integer a template's ``*`` or ``**`` may make (about 19,700 digits; the SDK cannot
encode more than 4,300 anyway)."""
MAX_STEPS = 100_000
"""Steps one rendering may take: a loop's iteration is one, a call CALL_STEPS. Loops over an
event's lists, one inside another, cost their product: two lists of 250,000 items each, from one
event of 1 MiB, would have held the dispatcher's workflow task for hours. On a 2-core machine
100,000 steps took 13 ms in a plain loop, 0.22 s in one that reads ``loop.last``, 75 ms of calls
to a macro."""
CALL_STEPS = 8

T = TypeVar("T")


@dataclass
class Meter:
    """The steps the renderings inside :func:`metered` took, each held to ``limit`` (None: no
    limit, as a workflow's run begun before the limit renders)."""

    limit: int | None
    steps: int = 0


@dataclass
class _Count:
    """One rendering's steps, against its limit."""

    limit: int | None
    taken: int = 0

    def take(self, steps: int = 1) -> None:
        self.taken += steps
        if self.limit is not None and self.taken > self.limit:
            raise SecurityError(f"it took more than {self.limit:,} steps (loop iterations, and calls at {CALL_STEPS})")

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            self.take()
            yield item


_METER: ContextVar[Meter | None] = ContextVar("signal_bridge_template_meter", default=None)
_COUNT: ContextVar[_Count | None] = ContextVar("signal_bridge_template_count", default=None)


@contextlib.contextmanager
def metered(limit: int | None = MAX_STEPS) -> Iterator[Meter]:
    """Count the steps of every rendering inside, each held to ``limit`` (outside, each is held to
    MAX_STEPS): what a workflow adds to its task's account of work."""
    meter = Meter(limit)
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def _counting(render: Callable[[], T]) -> T:
    meter = _METER.get()
    count = _Count(MAX_STEPS if meter is None else meter.limit)
    token = _COUNT.set(count)
    try:
        return render()
    finally:
        _COUNT.reset(token)
        if meter is not None:
            meter.steps += count.taken


# A missing field renders empty (None for a lone expression), as Go templates render
# "<no value>": a payload without an optional field must not stop its run from starting.
class _Env(ImmutableSandboxedEnvironment):
    # The operators whose result an event's values can make as large as they like.
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Payload keys win over dict methods: `.trigger.items` is the payload's `items`.
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if (count := _COUNT.get()) is not None:
            count.take(CALL_STEPS)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _bound_product(left, right)
        elif operator == "**":
            _bound_power(left, right)
        return super().call_binop(context, operator, left, right)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bound_product(left: Any, right: Any) -> None:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and _whole(times) and len(seq) * times > MAX_REPEATED:
            raise SecurityError(f"a repetition of {len(seq)} items {times} times is over {MAX_REPEATED} items")
    if _whole(left) and _whole(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"a product of integers over {MAX_INT_BITS} bits")


def _bound_power(base: Any, exponent: Any) -> None:
    if _whole(base) and _whole(exponent) and abs(base) > 1 and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS:
            raise SecurityError(f"a power of integers over {MAX_INT_BITS} bits")


_ENV = _Env(undefined=ChainableUndefined, autoescape=False)


def _url_component(value: Any) -> str:
    """An expression's value in a URL: percent-encoded, so it stays one segment or query value."""
    text = "" if value is None or isinstance(value, Undefined) else str(value)
    if text in (".", ".."):
        raise TemplateError(f"the value {text!r} cannot be put in a URL (it would be a relative path segment)")
    return quote(text, safe="")


_URL_ENV = _Env(undefined=ChainableUndefined, autoescape=False, finalize=_url_component)
STEPS_FILTER = "signal_bridge_steps"  # what every loop iterates through (_count_loops); not a call
# Rendering must be pure: the dispatcher renders ids and inputs in workflow code, where a value that
# differs on replay (Jinja's `random` filter, `lipsum()`) is a nondeterminism error that stops it.
for _env in (_ENV, _URL_ENV):
    _env.filters.pop("random", None)
    _env.filters[STEPS_FILTER] = lambda items: _counted(items)
    _env.globals.pop("lipsum", None)
_BLOCK = re.compile(r"({{.*?}}|{%.*?%})", re.DOTALL)
# A quoted string literal is matched first and given back unchanged; a dot elsewhere that
# starts a name (not an attribute access like `a.b` or `x().y`) is the Go-style leading dot.
_LEADING_DOT = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?<![\w\]\)'"])\.(?=[A-Za-z_])""")
_SINGLE = re.compile(r"^\s*{{(?P<expr>(?:(?!}}).)*)}}\s*$", re.DOTALL)


class TemplateError(BridgeError):
    """A template that does not parse or cannot be rendered against its context."""


def go_to_jinja(source: str) -> str:
    """``{{ .trigger.x }}`` → ``{{ trigger.x }}`` inside template blocks only."""
    return _BLOCK.sub(lambda m: _LEADING_DOT.sub(lambda s: s.group(1) or "", m.group(0)), source)


def check(value: Any) -> None:
    """Compile every string in ``value``; raise :class:`TemplateError` on the first bad one (a
    syntax error, or a filter or test Jinja does not have, such as ``random``)."""
    for text in _strings(value):
        try:
            _ENV.compile(go_to_jinja(text))
        except TemplateSyntaxError as exc:
            raise TemplateError(f"template {text!r} does not parse: {exc.message}") from None


def render(value: Any, context: dict[str, Any], *, cached: bool = True) -> Any:
    """Render strings anywhere inside ``value`` (dicts and lists are walked). A template that fails
    raises :class:`TemplateError` naming where it is in ``value``, never its text: the message may
    reach the event's sender, and the text may hold a value the config took from the environment.
    ``cached``: keep the compiled text for the next call (not a text that is new each call, as an
    http task's with its environment markers is: it would only push the others out)."""
    return _render(value, context, "", cached)


def _render(value: Any, context: dict[str, Any], at: str, cached: bool = True) -> Any:
    if isinstance(value, str):
        return _render_str(value, context, at, cached)
    if isinstance(value, dict):
        return {k: _render(v, context, f"{at}.{k}" if at else str(k), cached) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context, f"{at}[{i}]", cached) for i, v in enumerate(value)]
    return value


def render_url(text: str, context: dict[str, Any], *, cached: bool = True) -> str:
    """Render a URL template; each ``{{ expression }}``'s value is percent-encoded (see above).
    ``cached``: as :func:`render`'s."""
    try:
        template = _url_template(text) if cached else _compile_url(text)
        return _counting(lambda: template.render(**context))
    except TemplateSyntaxError as exc:  # checked at load: named, not quoted (it may hold markers)
        raise TemplateError(f"the URL template does not parse: {exc.message}") from None
    except TemplateError:
        raise
    except Exception as exc:  # as _render_str: the text is not quoted
        raise TemplateError(f"the URL template failed: {type(exc).__name__}: {safe(exc, 300)}") from None


def names(value: Any) -> set[str]:
    """The top-level names the templates in ``value`` read (``trigger``, ``tasks``, …)."""
    found: set[str] = set()
    for text in _strings(value):
        if "{{" in text or "{%" in text:
            try:
                found |= meta.find_undeclared_variables(_ENV.parse(go_to_jinja(text)))
            except TemplateSyntaxError as exc:
                raise TemplateError(f"template {text!r} does not parse: {exc.message}") from None
    return found


# Compiled once per text: a config has few templates, and the dispatcher renders them for every
# event in workflow code, where compiling each time (about 1-2 ms) held a workflow task past
# Temporal's deadlock detector. A text that does not parse raises, and is not kept.
_COMPILED = 4096


@lru_cache(maxsize=_COMPILED)
def _compiled(text: str) -> Callable[[dict[str, Any]], Any]:
    return _compile(text)


def _compile(text: str) -> Callable[[dict[str, Any]], Any]:
    source = go_to_jinja(text)
    single = _SINGLE.match(source)
    if single and "{%" not in source:
        expression = _ENV.compile_expression(single.group("expr"))
        return lambda context: expression(**context)
    template = _ENV.from_string(_count_loops(_ENV.parse(source)))
    return lambda context: template.render(**context)


def _count_loops(tree: nodes.Template) -> nodes.Template:
    """Every ``for`` loop iterates through the STEPS_FILTER, which counts its steps."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, STEPS_FILTER, [], [], None, None)
    return tree


def _counted(items: Iterable[Any]) -> Iterable[Any]:
    count = _COUNT.get()
    return items if count is None else count.iterate(items)


@lru_cache(maxsize=_COMPILED)
def _url_template(text: str) -> Template:
    return _compile_url(text)


def _compile_url(text: str) -> Template:
    return _URL_ENV.from_string(_count_loops(_URL_ENV.parse(go_to_jinja(text))))


def _render_str(text: str, context: dict[str, Any], at: str, cached: bool = True) -> Any:
    if "{{" not in text and "{%" not in text:
        return text
    where = f"the template at {at}" if at else "the template"
    try:
        render = _compiled(text) if cached else _compile(text)
        return _counting(lambda: render(context))
    except TemplateSyntaxError as exc:  # checked at load; named by place, like a failure
        raise TemplateError(f"{where} does not parse: {exc.message}") from None
    except Exception as exc:
        raise TemplateError(f"{where} failed: {type(exc).__name__}: {safe(exc, 300)}") from None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
