"""One compiled configuration: everything the adapters, the pipeline and the worker read.

A :class:`Snapshot` is built once per load (:func:`load`, :func:`parse`, :meth:`Snapshot.compile`)
and never changes: the validated model, the route table with its schemas and filters compiled, the
compiled webhooks and the bearer tokens. :class:`SnapshotSource` holds the current one; a reload
builds a whole new snapshot and swaps it in one assignment, or keeps the old one when the new file
is bad. Nothing here touches the filesystem per event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bridge.auth import Tokens
from bridge.config import BridgeConfig, parse_config, read_config
from bridge.errors import ConfigError
from bridge.routing import RouteTable
from bridge.webhooks import WebhookRoute, compile_webhooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    config: BridgeConfig
    routes: RouteTable
    webhooks: Mapping[str, WebhookRoute]
    tokens: Tokens
    origin: str = "config"

    @classmethod
    def compile(cls, config: BridgeConfig, *, origin: str = "config") -> Snapshot:
        """Compile every schema, filter, template and verifier; ConfigError names what is wrong."""
        return cls(
            config=config,
            routes=RouteTable.from_config(config, origin=origin),
            webhooks=MappingProxyType(compile_webhooks(config.webhooks, origin=origin)),
            tokens=Tokens(config.http.auth.by_name),
            origin=origin,
        )


def parse(data: Any, *, origin: str = "config") -> Snapshot:
    """A snapshot from already-parsed YAML/JSON data."""
    return Snapshot.compile(parse_config(data, origin=origin), origin=origin)


def load(path: str | Path, env: dict[str, str] | None = None) -> Snapshot:
    """Read, interpolate, validate and compile a config file."""
    return Snapshot.compile(read_config(path, env), origin=str(path))


class SnapshotSource:
    """The current snapshot, and where a reload reads the next one from.

    ``current`` is a plain attribute: reading it is free, and a reload replaces it whole, so a
    request sees either the old snapshot or the new one, never a mix. ``prepare`` may adjust a
    freshly read config (the runtime applies environment overrides) before it is compiled.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        path: str | Path | None = None,
        *,
        prepare: Callable[[BridgeConfig], BridgeConfig] = lambda config: config,
    ) -> None:
        self.current = snapshot
        self.path = Path(path) if path is not None else None
        self._prepare = prepare
        self._loaded = self._stat()  # the file as the current snapshot was read from it
        self._looked = self._loaded  # as the watcher's last look saw it
        self.refusals = 0  # files refused so far (a reload that kept the previous snapshot)

    def __call__(self) -> Snapshot:
        return self.current

    def _stat(self) -> tuple[int, int, int] | None:
        """What tells one version of the file from another: modification time, size, inode."""
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        """True when the file differs from the one last loaded and is as the previous look saw it
        (for a watcher): a file an editor or a script rewrites in place is read once it has
        settled, not half-written. A half-written file may still be valid YAML with fewer
        workflows: swapped in, the events of the ones missing were refused, skipped, or taken by
        the dispatcher and then found unroutable, until the next look."""
        if self.path is None:
            return False
        now, before = self._stat(), self._looked
        self._looked = now
        return now != self._loaded and now == before

    def reload(self) -> bool:
        """Load the file again and swap the snapshot; on any error keep the current one.

        Returns True when a new snapshot is in place.
        """
        if self.path is None:
            return False
        version = self._stat()
        try:
            snapshot: Snapshot | Exception = Snapshot.compile(
                self._prepare(read_config(self.path)), origin=str(self.path)
            )
        except Exception as exc:  # ConfigError, or a bug of ours on some file (logged with its traceback)
            snapshot = exc
        if self._stat() != version:  # changed while it was read: what was read may be half of it
            log.info("config reload put off: %s changed while it was read", self.path)
            return False
        self._loaded = version  # a refused file is not tried again on every watcher tick
        if isinstance(snapshot, Exception):
            self.refusals += 1
            bug = not isinstance(snapshot, ConfigError)
            why = "the file could not be compiled" if bug else snapshot
            log.error("config reload refused, keeping the previous one: %s", why, exc_info=snapshot if bug else None)
            return False
        self.current = snapshot
        log.info("config reloaded path=%s workflows=%d", self.path, len(snapshot.routes.workflows))
        return True
