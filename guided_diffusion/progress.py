"""Progress output that fits where it goes: a live tqdm bar on a terminal; on a file or a pipe (a batch job's log)
one plain line every `interval` seconds (SEG_PROGRESS_SECONDS, default 30) and one at the end, so `tail -f` of a
cluster log stays readable and a 10-minute run writes a few KB, not the bar's every redraw."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    raw = os.environ.get("SEG_PROGRESS_SECONDS", "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def _clock(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:02d}:{rest % 60:02d}"


class PlainProgress:
    """The subset of tqdm's interface the toolkit uses (update, set_postfix, write, close, n, total, iteration),
    printing `desc: n/total unit (p%), rate, ETA, postfix` lines at most every `interval` seconds."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, disable: bool = False, file: TextIO | None = None, interval: float | None = None,
                 **_ignored: Any):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, initial, initial
        self.file = file if file is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.started = self.last = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self.closed, self.shown = False, initial

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.unit != "s" and rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _emit(self) -> None:
        if not self.disable:
            print(self.line(), file=self.file, flush=True)
        self.last, self.shown = time.perf_counter(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.shown:
                self._emit()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_terminal(file: TextIO | None = None) -> bool:
    file = file if file is not None else sys.stderr
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar on a terminal (refreshed at most once a second), plain periodic lines elsewhere; same calls."""
    if is_terminal(kwargs.get("file")):
        from tqdm.auto import tqdm

        kwargs.setdefault("mininterval", 1.0)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


def write(message: str) -> None:
    """A line that does not break a live bar (tqdm.write on a terminal, a plain print elsewhere)."""
    if is_terminal():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
