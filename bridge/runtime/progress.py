"""A one-line text progress bar for the CLI, drawn on stderr only when it is a terminal.

Log lines go to stderr too: while the bar is shown, :meth:`ProgressBar.around_logging` clears it
before each record is written, and the next update draws it again below.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import TextIO

WIDTH = 30
INTERVAL = 0.1


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self._drawn = 0.0
        self._shown = False

    def update(self, done: int, total: int | None = None, note: str = "", *, force: bool = False) -> None:
        """Draw ``done`` of ``total`` (a bar) or ``done`` alone (no total), at most every 0.1 s."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < INTERVAL:
            return
        self._drawn = now
        self.stream.write("\r\033[K" + render(self.label, done, total, note))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def finish(self, done: int, total: int | None = None, note: str = "") -> None:
        """Draw the last state and end the line."""
        if self.enabled:
            self.update(done, total, note, force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False

    @contextlib.contextmanager
    def around_logging(self) -> Iterator[None]:
        """Clear the bar before any log record is written by the root logger's handlers."""
        if not self.enabled:
            yield
            return
        keeper = _Clear(self)
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(keeper)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(keeper)


def render(label: str, done: int, total: int | None, note: str = "") -> str:
    if total:
        filled = int(WIDTH * min(1.0, done / total))
        text = f"{label} [{'#' * filled}{'-' * (WIDTH - filled)}] {done}/{total}"
    else:
        text = f"{label} {done}"
    return f"{text} {note}".rstrip()


class _Clear(logging.Filter):
    def __init__(self, bar: ProgressBar) -> None:
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        self.bar.clear()
        return True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
