"""Progress that suits both a person at a terminal and a log file.

On a terminal, tqdm bars redraw in place. When output goes to a file or a pipe, bars would fill
it with frames, so they are switched off and `PlainProgress` prints a plain line now and then
instead (step, the latest numbers, tokens/s, time left). Messages go through `say`, which prints
above a live bar without tearing it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether progress goes to a terminal (stderr is where tqdm draws)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on a terminal; a disabled one (that prints nothing) when output is redirected."""
    return tqdm(iterable, disable=not (enabled and interactive()), dynamic_ncols=True, **options)


def say(message: str) -> None:
    """One line to stderr (through tqdm, so a live bar is redrawn below it)."""
    tqdm.write(message, file=sys.stderr)


class PlainProgress:
    """Plain progress lines when output is redirected: at most one per `every_s` seconds (and
    always the last), each with the step, the caller's numbers, the rate and the time left."""

    def __init__(
        self,
        name: str,
        total: int,
        *,
        initial: int = 0,
        enabled: bool = True,
        every_s: float = 15.0,
        unit: str = "step",
    ):
        self.name, self.total, self.unit, self.initial = name, total, unit, initial
        self.enabled = enabled and not interactive()
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = -float("inf")

    def update(self, done: int, **numbers: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = (done - self.initial) / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        fields = " ".join(f"{k} {v}" for k, v in numbers.items())
        say(f"{self.name}: {self.unit} {done}/{self.total} {fields} ({rate:.2f} {self.unit}/s, {left:.0f} s left)")
