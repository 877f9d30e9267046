"""Templates: Jinja2, with the seed's Go-style leading dot accepted (`{{ .trigger.orderId }}`).

A string that is a single ``{{ expression }}`` renders to the expression's value (an object stays
an object); anything else renders to text. Rendering is pure, so the dispatcher may run it in
workflow code.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import ChainableUndefined, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bridge.errors import BridgeError


# A missing field renders empty (None for a lone expression), as Go templates render
# "<no value>": a payload without an optional field must not stop its run from starting.
class _Env(ImmutableSandboxedEnvironment):
    def getattr(self, obj: Any, attribute: str) -> Any:
        # Payload keys win over dict methods: `.trigger.items` is the payload's `items`.
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_ENV = _Env(undefined=ChainableUndefined, autoescape=False)
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
    """Parse every string in ``value``; raise :class:`TemplateError` on the first bad one."""
    for text in _strings(value):
        try:
            _ENV.parse(go_to_jinja(text))
        except TemplateSyntaxError as exc:
            raise TemplateError(f"template {text!r} does not parse: {exc.message}") from None


def render(value: Any, context: dict[str, Any]) -> Any:
    """Render strings anywhere inside ``value`` (dicts and lists are walked)."""
    if isinstance(value, str):
        return _render_str(value, context)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


def _render_str(text: str, context: dict[str, Any]) -> Any:
    if "{{" not in text and "{%" not in text:
        return text
    source = go_to_jinja(text)
    try:
        single = _SINGLE.match(source)
        if single and "{%" not in source:
            return _ENV.compile_expression(single.group("expr"))(**context)
        return _ENV.from_string(source).render(**context)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template {text!r} does not parse: {exc.message}") from None
    except Exception as exc:
        raise TemplateError(f"template {text!r} failed: {exc}") from None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
