"""Templates: Jinja2, with the seed's Go-style leading dot accepted (`{{ .trigger.orderId }}`).

A string that is a single ``{{ expression }}`` renders to the expression's value (an object stays
an object); anything else renders to text. :func:`render_url` renders a URL: every expression's
value is percent-encoded as one path segment or query value, so a payload cannot add a ``/``, a
``?``, a ``&`` or a ``..`` segment. Rendering is pure, so the dispatcher may run it in workflow
code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache, update_wrapper
from typing import Any
from urllib.parse import quote

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from markupsafe import Markup

from bridge import template_steps as steps
from bridge.errors import BridgeError
from bridge.logsafe import safe
from bridge.template_steps import MAX_STEPS, Meter, metered

__all__ = ["MAX_STEPS", "Meter", "TemplateError", "check", "go_to_jinja", "metered", "names", "render", "render_url"]

MAX_REPEATED = 2 * 1024 * 1024
"""Items of a string or list a template's ``*`` may make: more could never fit a run's argument
(the dispatcher's MAX_TARGET_BYTES), and an event's ``{"qty": "x", "price": 600000000}`` under
``{{ .trigger.qty * .trigger.price }}`` took 5.9 s and 1.8 GB in the dispatcher's workflow task."""
MAX_INT_BITS = 64 * 1024
"""Bits of an integer a template's ``*`` or ``**`` may make (about 19,700 digits; the SDK cannot
encode more than 4,300 anyway)."""


# A missing field renders empty (None for a lone expression), as Go templates render
# "<no value>": a payload without an optional field must not stop its run from starting.
class _Env(ImmutableSandboxedEnvironment):
    # The operators whose result an event's values can make as large as they like, or large:
    # ``*`` and ``**`` are bounded before, and every one's result is charged (template_steps).
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Payload keys win over dict methods: `.trigger.items` is the payload's `items`.
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        args = steps.charged_call(__obj, args, kwargs)
        return steps.made(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _bound_product(left, right)
        elif operator == "**":
            _bound_power(left, right)
        elif operator == "%" and isinstance(left, str):
            steps.printf_asked(left, right)
        return steps.copied(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja's, with formatters that check each field's width before it is made.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text: str = value.__self__
        kind = type(text)  # a Markup's format is a Markup, its values escaped
        formatter = _EscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else _Formatter(self)
        vformat = formatter.vformat
        if value.__name__ == "format_map":

            def format_map(*args: Any, **kwargs: Any) -> str:
                if kwargs or len(args) != 1:
                    return wrapped(*args, **kwargs)  # Jinja's error
                return kind(vformat(text, (), args[0]))

            return update_wrapper(format_map, value)

        def format_(*args: Any, **kwargs: Any) -> str:
            return kind(vformat(text, args, kwargs))

        return update_wrapper(format_, value)


class _Asking:
    """A formatter's fields checked as they are formatted, all of one format together."""

    asked = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self.asked = 0
        return super().vformat(format_string, args, kwargs)  # type: ignore[misc, no-any-return]

    def format_field(self, value: Any, format_spec: str) -> Any:
        self.asked = steps.spec_asked(format_spec, value, self.asked)
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _Formatter(_Asking, SandboxedFormatter):
    pass


class _EscapeFormatter(_Asking, SandboxedEscapeFormatter):
    pass


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
# Rendering must be pure: the dispatcher renders ids and inputs in workflow code, where a value that
# differs on replay (Jinja's `random` filter, `lipsum()`) is a nondeterminism error that stops it.
for _env in (_ENV, _URL_ENV):
    _env.filters.pop("random", None)
    steps.install(_env.filters, _env.tests)
    _env.globals["dict"] = steps.safe_dict
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
    return steps.counting(lambda: _render(value, context, "", cached))  # one limit for all its strings


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
        return steps.counting(lambda: "".join(steps.written(template.generate(**context))))
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
        expression = _compile_expression(single.group("expr"))
        return lambda context: expression(**context)
    template = _ENV.from_string(steps.count_steps(_ENV.parse(source)))
    return lambda context: "".join(steps.written(template.generate(**context)))


def _compile_expression(source: str) -> TemplateExpression:
    """As ``Environment.compile_expression``, with the steps counted (template_steps)."""
    parser = Parser(_ENV, source, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise TemplateSyntaxError("chunk after expression", parser.stream.current.lineno, None, None)
    expr.set_environment(_ENV)
    body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
    template = _ENV.from_string(steps.count_steps(nodes.Template(body, lineno=1)))
    return TemplateExpression(template, True)


@lru_cache(maxsize=_COMPILED)
def _url_template(text: str) -> Template:
    return _compile_url(text)


def _compile_url(text: str) -> Template:
    return _URL_ENV.from_string(steps.count_steps(_URL_ENV.parse(go_to_jinja(text))))


def _render_str(text: str, context: dict[str, Any], at: str, cached: bool = True) -> Any:
    if "{{" not in text and "{%" not in text:
        return text
    where = f"the template at {at}" if at else "the template"
    try:
        return (_compiled(text) if cached else _compile(text))(context)
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
