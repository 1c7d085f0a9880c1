"""Progress and cancellation for every long loop of the engine.

A loop reports one unit of work at a time (a decoded frame, a token, a denoising step, a reward
batch)::

    with progress(total, "sampling") as bar:
        for ...:
            ...
            bar.update()          # reports, then raises Cancelled if the host asked to stop

Headless the bar is tqdm. A host installs its own reporter with ``use_reporter``; ComfyUI's
progress hook checks its Cancel flag on each update, so every update is an interrupt point. A host
can also install a plain cancel check with ``use_cancel_check`` (tests use a threading.Event).
"""

from __future__ import annotations

import contextlib
import contextvars
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


class _TqdmBar:
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False, disable=_quiet.get() or None)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


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
    inner = factory(total, desc) if factory is not None else _TqdmBar(total, desc)
    bar = _CheckedBar(inner, _cancel_check.get())
    raise_if_cancelled()
    try:
        yield bar
    finally:
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
