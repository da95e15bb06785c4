"""The publisher's progress on stderr: a bar redrawn in place on a terminal, a line every few seconds elsewhere."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TextIO


class Progress:
    """A progress bar updated in place (\\r) on a terminal, or a line every few seconds elsewhere."""

    def __init__(self, total: int, *, mode: str, out: TextIO, label: str) -> None:
        if mode == "auto":
            mode = "bar" if out.isatty() else "lines"
        self._mode = mode
        self._total = total
        self._out = out
        self._label = label
        self._samples: deque[tuple[float, int]] = deque()
        self._last_render = time.monotonic()

    def update(self, published: int, confirmed: int, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, confirmed))
        while len(self._samples) > 2 and now - self._samples[1][0] >= 1.0:
            self._samples.popleft()
        if self._mode == "none" or now - self._last_render < (0.2 if self._mode == "bar" else 5.0):
            return
        self._last_render = now
        self._render(published, confirmed)

    def rate(self) -> float:
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def _render(self, published: int, confirmed: int) -> None:
        rate = self.rate()
        done = confirmed / self._total if self._total else 1.0
        if self._mode == "bar":
            width = 30
            filled = min(width, int(done * width))
            eta = f"ETA {math.ceil((self._total - confirmed) / rate)}s" if rate > 0 and confirmed < self._total else ""
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {100 * done:5.1f}%  {confirmed:,}/{self._total:,} confirmed"
                f"  {published - confirmed:,} in flight  {rate:,.0f} msg/s  {eta}"
            )
            self._out.write(f"\r{line:<100}")
        else:
            self._out.write(
                f"{self._label}: {confirmed:,}/{self._total:,} confirmed ({100 * done:.0f}%), "
                f"{published - confirmed:,} in flight, {rate:,.0f} msg/s\n"
            )
        self._out.flush()

    def finish(self, published: int, confirmed: int) -> None:
        if self._mode == "bar":
            self._render(published, confirmed)
            self._out.write("\n")
            self._out.flush()
