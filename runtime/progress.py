"""A progress display for work that takes more than a second (loading weights, warming up).

On a terminal it redraws one stderr line (``loading weights  [#####.....]  130/272  1.2 s``) once the work has
taken more than a second; elsewhere (logs, CI, pipes) it stays quiet and prints one summary line at the end.
``KUBELLM_PROGRESS=0`` silences it entirely.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 30
SHOW_AFTER_S = 1.0  # draw nothing for work that finishes quicker than this
REDRAW_EVERY_S = 0.1


class Progress:
    """``with Progress("loading weights", total=272, unit="tensors") as p: ... p.update()``."""

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        summary: bool = True,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.stream: TextIO = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = os.environ.get("KUBELLM_PROGRESS", "1") not in {"0", "false", "no", "off"}
        self.enabled = enabled
        self.summary = summary
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count = 0
        self.note = ""  # an extra word for the summary, e.g. "(412 MiB)"
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._closed = False

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def update(self, n: int = 1) -> None:
        self.count += n
        if not (self.enabled and self.is_tty):
            return
        now = time.monotonic()
        if now - self.start < SHOW_AFTER_S or now - self._last_draw < REDRAW_EVERY_S:
            return
        self._last_draw = now
        self._drawn = True
        self.stream.write("\r" + self.render_line() + "\x1b[K")
        self.stream.flush()

    def render_line(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            done = min(self.count, self.total)
            filled = BAR_WIDTH * done // self.total
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            return f"{self.description}  [{bar}]  {done}/{self.total}{unit}  {self.elapsed_s:.1f} s"
        return f"{self.description}  {self.count}{unit}  {self.elapsed_s:.1f} s"

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\r\x1b[K")
        if self.summary and not failed:
            unit = f" {self.unit}" if self.unit else ""
            note = f" {self.note}" if self.note else ""
            self.stream.write(f"{self.description}: {self.count}{unit}{note} in {self.elapsed_s:.1f} s\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)
