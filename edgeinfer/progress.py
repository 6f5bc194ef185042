"""A progress bar on stderr: redrawn in place on a terminal, start and end lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, unit: str = ""):
        self.label, self.unit = label, unit
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._started = False

    def __call__(self, done: int, total: int) -> None:
        if not self._started:
            self._started = True
            if not self._tty:
                print(f"{self.label} ...", file=sys.stderr, flush=True)
        now = time.monotonic()
        if self._tty and (done >= total or now - self._last > 0.1):
            self._last = now
            width = 30
            filled = width * done // max(total, 1)
            print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{self.unit}",
                  end="", file=sys.stderr, flush=True)
        if done >= total:
            print("" if self._tty else f"{self.label}: done", file=sys.stderr, flush=True)


class StageProgress:
    """progress(stage, done, total) as one terminal bar per stage."""

    def __init__(self):
        self._bars: dict[str, Progress] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._bars:
            self._bars[stage] = Progress(stage)
        self._bars[stage](done, total)
