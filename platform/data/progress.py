"""Progress of a long ``prepare``, for a person: files done of total, clips/s, rejects so
far and the time left.

On a terminal the line is redrawn in place (at most a few times a second); in a log (not a
terminal) a line is printed every ``log_every_s`` seconds, and once at the end. Rates and
the time left count this run's work only, so a resumed run does not claim the committed
files as its own speed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

PREFIX = "[vitok.data]"
REDRAW_S = 0.5  # terminal: redraw at most this often
LOG_EVERY_S = 30.0  # log: one line this often


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PrepareProgress:
    """``update`` after each committed unit; ``close`` once. Quiet when ``enabled`` is False."""

    def __init__(
        self,
        total_files: int,
        *,
        done_files: int = 0,
        done_clips: int = 0,
        done_rejects: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every_s: float = LOG_EVERY_S,
        clock=time.monotonic,
    ) -> None:
        self.total = total_files
        self.files, self.clips, self.rejects = done_files, done_clips, done_rejects
        self.resumed_files = done_files
        self.enabled = enabled
        self.stream = stream
        self.log_every_s = log_every_s
        self.clock = clock
        self.started = clock()
        self._shown_at: float | None = None
        self._width = 0
        self._run_files = self._run_clips = 0

    def _out(self) -> TextIO:
        return self.stream or sys.stdout  # looked up when drawing: tests capture stdout

    def _tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def start(self) -> None:
        """The first line: what is already committed (a resumed run) and what is left."""
        if not self.enabled:
            return
        if self.resumed_files:
            print(
                f"{PREFIX} resuming: {self.resumed_files} of {self.total} files already "
                f"committed ({self.clips} clips, {self.rejects} rejects); decoding "
                f"{self.total - self.resumed_files}",
                file=self._out(),
                flush=True,
            )
        self._show(force=True)

    def update(self, files: int, clips: int, rejects: int) -> None:
        self.files += files
        self.clips += clips
        self.rejects += rejects
        self._run_files += files
        self._run_clips += clips
        self._show()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        pct = 100.0 * self.files / self.total if self.total else 100.0
        parts = [f"{self.files}/{self.total} files ({pct:.0f}%)", f"{self.clips} clips"]
        if self._run_files and elapsed > 0:
            parts.append(f"{self._run_clips / elapsed:.1f} clips/s")
            left = (self.total - self.files) * elapsed / self._run_files
            parts.append(f"{self.rejects} rejects")
            parts.append(f"{format_seconds(left)} left")
        else:
            parts.append(f"{self.rejects} rejects")
            parts.append("time left: measuring")
        return f"{PREFIX} " + ", ".join(parts)

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        every = REDRAW_S if self._tty() else self.log_every_s
        if not force and self._shown_at is not None and now - self._shown_at < every:
            return
        self._shown_at = now
        text = self.line()
        if self._tty():
            pad = " " * max(0, self._width - len(text))
            self._out().write(f"\r{text}{pad}")
            self._width = len(text)
        else:
            self._out().write(text + "\n")
        self._out().flush()

    def close(self) -> None:
        """The final line (a terminal's line is finished with a newline)."""
        if not self.enabled:
            return
        self._show(force=True)
        if self._tty():
            self._out().write("\n")
            self._out().flush()
