"""Progress and cancellation for every long loop of the engine.

A loop reports one unit of work at a time (a decoded frame, a token, a denoising step, a reward
batch)::

    with progress(total, "sampling") as bar:
        for ...:
            ...
            bar.update()          # reports, then raises Cancelled if the host asked to stop

Headless the bar is tqdm on a terminal. When stderr is not a terminal (output redirected to a file, a
batch job's log) tqdm draws nothing, so the outermost running loop writes plain lines to stderr instead,
at most one every ``LOG_INTERVAL_S`` seconds (``sampling: 22/50 (44%), 10.1 s elapsed, about 12.9 s
left``) and a last one when it ends, if it logged before or ran longer than that; loops nested inside it
stay silent (a training run logs its steps, not every denoising loop of every rollout).

A host installs its own reporter with ``use_reporter``; ComfyUI's progress hook checks its Cancel flag
on each update, so every update is an interrupt point. A host can also install a plain cancel check with
``use_cancel_check`` (tests use a threading.Event).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Callable, Iterator, Protocol

from .errors import Cancelled


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


ReporterFactory = Callable[[int, str], Bar]

_reporter: contextvars.ContextVar[ReporterFactory | None] = contextvars.ContextVar("vans_reporter", default=None)
_cancel_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "vans_cancel_check", default=None
)
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("vans_quiet", default=False)
_logging: contextvars.ContextVar[bool] = contextvars.ContextVar("vans_progress_logging", default=False)


class _TqdmBar:
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False, disable=_quiet.get() or None)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


LOG_INTERVAL_S = 10.0  # seconds between two progress lines when stderr is not a terminal


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_seconds(value: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 07 min."""
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class _LogBar:
    """Progress as plain lines on stderr, for logs: at most one line per ``interval`` seconds."""

    def __init__(self, total: int, desc: str, *, interval: float | None = None,
                 clock: Callable[[], float] | None = None):
        self.total, self.desc, self.done = max(0, int(total)), desc, 0
        self.interval = LOG_INTERVAL_S if interval is None else interval
        self._clock = clock or time.monotonic
        self._start = self._last = self._clock()
        self._lines = 0
        self._closed = False

    def _write(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)
        self._lines += 1

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            elapsed = now - self._start
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            percent = f" ({100 * self.done // self.total}%)" if self.total else ""
            eta = f", about {format_seconds(left)} left" if left == left else ""
            self._write(f"{self.done}/{self.total}{percent}, {format_seconds(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = self._clock() - self._start
        if self._lines or elapsed >= self.interval:
            ended = "done" if self.done >= self.total else "stopped at"
            self._write(f"{ended} {self.done}/{self.total} after {format_seconds(elapsed)}")


def _is_secondary_process() -> bool:
    """A process of ``accelerate launch`` / torchrun other than rank 0: its log lines would repeat rank 0's."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def _default_bar(total: int, desc: str) -> Bar:
    if _quiet.get() or _logging.get() or _stderr_is_terminal() or _is_secondary_process():
        return _TqdmBar(total, desc)  # draws on a terminal; nothing when quiet or not a terminal
    return _LogBar(total, desc)


class _CheckedBar:
    """Wraps a host bar: every update also runs the cancel check."""

    def __init__(self, inner: Bar, check: Callable[[], bool] | None):
        self._inner = inner
        self._check = check

    def update(self, n: int = 1) -> None:
        self._inner.update(n)
        raise_if_cancelled()

    def close(self) -> None:
        self._inner.close()


def raise_if_cancelled() -> None:
    check = _cancel_check.get()
    if check is not None and check():
        raise Cancelled("cancelled by the user")


@contextlib.contextmanager
def progress(total: int, desc: str) -> Iterator[Bar]:
    factory = _reporter.get()
    inner = factory(total, desc) if factory is not None else _default_bar(total, desc)
    bar = _CheckedBar(inner, _cancel_check.get())
    token = _logging.set(True) if isinstance(inner, _LogBar) else None  # nested loops stay silent
    try:
        raise_if_cancelled()
        yield bar
    finally:
        if token is not None:
            _logging.reset(token)
        bar.close()


@contextlib.contextmanager
def use_reporter(factory: ReporterFactory) -> Iterator[None]:
    token = _reporter.set(factory)
    try:
        yield
    finally:
        _reporter.reset(token)


@contextlib.contextmanager
def use_cancel_check(check: Callable[[], bool]) -> Iterator[None]:
    token = _cancel_check.set(check)
    try:
        yield
    finally:
        _cancel_check.reset(token)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the tqdm bars (tests, batch jobs)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)
