"""``${VAR}`` and ``${VAR:-default}`` in the config file: where each is replaced, and when.

Everywhere but in a task's config, a reference is replaced when the file is loaded. In an http
task's ``url``, ``method``, ``headers`` and ``body`` it is kept as written (only checked, so a
typo still fails the load) and replaced by the activity that makes the call, from the worker's
environment, after the templates are rendered: Temporal's history (the task list the runner
loads, the activity's input, any error) then holds the reference, never the value. A template
task's output is recorded in history, so a reference there is refused at load. The rules for
users are in docs/configuration.md, "Secrets".
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import ConfigError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DEFERRED = ("url", "method", "headers", "body")  # the http task keys replaced at call time
_MARKED = re.compile(r"@@[0-9a-fA-F]+(?:\.\d*(?:@@?)?)?")
_SCRUB_MIN = 4  # substituted values shorter than this are not scrubbed from messages


def interpolate(text: str, env: Mapping[str, str] | None = None, *, origin: str = "config") -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""
    env = os.environ if env is None else env
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    out = REFERENCE.sub(sub, text)
    if missing:
        raise ConfigError(f"{origin}: environment variable(s) not set: {', '.join(missing)}")
    return out


def interpolate_tree(node: Any, env: Mapping[str, str] | None, origin: str) -> Any:
    if isinstance(node, str):
        return interpolate(node, env, origin=origin)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env, origin) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env, origin) for v in node]
    return node


def references(node: Any) -> list[str]:
    """The variable names referenced anywhere in ``node``'s strings, in order."""
    if isinstance(node, str):
        return [m.group(1) for m in REFERENCE.finditer(node)]
    if isinstance(node, dict):
        return [n for v in node.values() for n in references(v)]
    if isinstance(node, list):
        return [n for v in node for n in references(v)]
    return []


def interpolate_config(
    data: Any, env: Mapping[str, str] | None, origin: str, *, task_kind: Callable[[Any], str | None]
) -> Any:
    """The parsed file with every reference replaced, except those a task's config keeps."""
    if not isinstance(data, dict) or not isinstance(data.get("workflows"), list):
        return interpolate_tree(data, env, origin)
    out = {k: interpolate_tree(v, env, origin) for k, v in data.items() if k != "workflows"}
    out["workflows"] = [_workflow(w, env, origin, task_kind) for w in data["workflows"]]
    return out


def _workflow(wf: Any, env: Mapping[str, str] | None, origin: str, task_kind: Callable[[Any], str | None]) -> Any:
    if not isinstance(wf, dict) or not isinstance(wf.get("tasks"), list):
        return interpolate_tree(wf, env, origin)
    out = {k: interpolate_tree(v, env, origin) for k, v in wf.items() if k != "tasks"}
    where = f"{origin}: workflow {out.get('id')!r}"
    out["tasks"] = [_task(t, env, where, task_kind) for t in wf["tasks"]]
    return out


def _task(task: Any, env: Mapping[str, str] | None, where: str, task_kind: Callable[[Any], str | None]) -> Any:
    if not isinstance(task, dict) or not isinstance(task.get("config"), dict):
        return interpolate_tree(task, env, where)
    out = {k: interpolate_tree(v, env, where) for k, v in task.items() if k != "config"}
    config: dict[str, Any] = task["config"]
    here = f"{where}, task {out.get('id')!r}"
    if task_kind({**out, "config": config}) != "http":
        for name in references(config):
            raise ConfigError(
                f"{here}: ${{{name}}} in a template task: its output is recorded in Temporal's history, "
                "so it cannot read the environment (an http task's url, method, headers and body can)"
            )
        out["config"] = config
        return out
    for key in DEFERRED:
        if key in config:
            interpolate_tree(config[key], env, here)  # checked now, replaced when the call is made
    out["config"] = {k: v if k in DEFERRED else interpolate_tree(v, env, here) for k, v in config.items()}
    return out


@dataclass
class Substitution:
    """The values a :func:`defer` call stands in for, behind markers nobody else can write."""

    token: str
    values: list[str] = field(default_factory=list)

    def marker(self, index: int) -> str:
        return f"@@{self.token}.{index}@@"

    def restore(self, node: Any) -> Any:
        """``node`` with every marker replaced by its value (strings anywhere inside it)."""
        if isinstance(node, str):
            if self.token not in node:
                return node
            return re.sub(rf"@@{self.token}\.(\d+)@@", lambda m: self.values[int(m.group(1))], node)
        if isinstance(node, dict):
            return {k: self.restore(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.restore(v) for v in node]
        return node

    def found_in(self, node: Any) -> bool:
        """Whether ``node`` holds the marker token, in any letter case: in a string, a key, or the
        text of any other value (a tuple a lone expression rendered is sent as its ``str``)."""
        token = self.token.lower()
        if isinstance(node, dict):
            return any(self.found_in(k) or self.found_in(v) for k, v in node.items())
        if isinstance(node, list):
            return any(self.found_in(v) for v in node)
        if node is None or isinstance(node, bool | int | float):
            return False
        return token in str(node).lower()

    def scrub(self, text: str) -> str:
        """``text`` with every substituted value (of a few characters or more) masked, and every
        marker, or the start of one a message cut (a template's error may quote the marked text)."""
        text = _MARKED.sub("***", text)
        for value in sorted(self.values, key=len, reverse=True):
            if len(value) >= _SCRUB_MIN:
                text = text.replace(value, "***")
        return text


def defer(node: Any, env: Mapping[str, str] | None = None, *, origin: str = "task") -> tuple[Any, Substitution]:
    """``node`` with each ``${VAR}`` replaced by a random marker, and the values behind them.

    Templates are rendered on the marked text, so a value is never template source and a
    ``${...}`` a payload brings in is never looked up; :meth:`Substitution.restore` then puts the
    values in. An unset variable without a default raises ConfigError.
    """
    env = os.environ if env is None else env
    sub = Substitution(secrets.token_hex(16))

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name not in env and default is None:
            raise ConfigError(f"{origin}: environment variable {name} is not set")
        sub.values.append(env[name] if name in env else default)
        return sub.marker(len(sub.values) - 1)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return REFERENCE.sub(one, value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(node), sub
