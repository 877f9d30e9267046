"""Pydantic's error locations, said the way a config's author finds the line: ``workflow 'x', trigger 'y'``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def describe(exc: ValidationError, data: dict[str, Any], origin: str) -> str:
    """Turn pydantic's locations into 'workflow 'x', trigger 'y'' so users find the line."""
    lines = []
    for err in exc.errors():
        where: list[str] = []
        node: Any = data
        loc = list(err["loc"])
        i = 0
        while i < len(loc):
            part = loc[i]
            nxt = loc[i + 1] if i + 1 < len(loc) else None
            if isinstance(part, str) and isinstance(nxt, int) and isinstance(node, dict):
                items = node.get(part)
                item = items[nxt] if isinstance(items, list) and nxt < len(items) else None
                where.append(_label(part, nxt, item))
                node = item
                i += 2
                continue
            where.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
            i += 1
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{origin}: {', '.join(where) or 'top level'}: {msg}")
    return "\n".join(lines)


_SINGULAR = {
    "workflows": "workflow",
    "triggers": "trigger",
    "tasks": "task",
    "kafka": "kafka",
    "amqp": "amqp",
    "webhooks": "webhook",
    "events": "event",
    "bindings": "binding",
}


def _label(section: str, index: int, item: Any) -> str:
    noun = _SINGULAR.get(section, section)
    if isinstance(item, dict):
        for key in ("id", "name", "slug", "queue"):
            if isinstance(item.get(key), str) and item[key]:
                return f"{noun} {item[key]!r}"
    return f"{noun} #{index + 1}"
