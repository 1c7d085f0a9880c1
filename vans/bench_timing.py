"""Timing and memory helpers of ``python -m vans.bench``: CUDA-event timing, exclusive per-phase wall seconds,
peak memory, and the log lines the benchmark prints (the device machine has no TTY)."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import time

import torch

def cuda_time(fn, *, warmup: int = 2, repeat: int = 10) -> float:
    """Median seconds of ``fn`` with CUDA events (synchronised), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Exclusive wall seconds per phase: a phase running inside another (the negative prompt encoded
    inside ``sample``) counts for itself only. Synchronises the device around each phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._children: list[float] = []

    def reset(self) -> None:
        self.seconds.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync(self.device)
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            _sync(self.device)
            elapsed = time.perf_counter() - start
            inner = self._children.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._children:
                self._children[-1] += elapsed

    def wrap(self, obj, method: str, name: str, after=None) -> None:
        """Time ``obj.method`` as phase ``name`` (an instance attribute shadows the class method)."""
        original = getattr(obj, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.phase(name):
                out = original(*args, **kwargs)
            if after is not None:
                after(out)
            return out

        setattr(obj, method, timed)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict:
    """Peak GPU memory since the last ``reset_peak`` (GiB), or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_rss_gib_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _LogBar:
    """Progress reporter for logs (no TTY on the device machine): start, every quarter, end, with seconds."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = max(1, int(total)), desc, 0
        self.start = time.perf_counter()
        self.next_mark = self.total / 4
        if self.total >= 16:
            _log(f"  {desc}: 0/{self.total}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total >= 16 and self.done >= self.next_mark and self.done < self.total:
            _log(f"  {self.desc}: {self.done}/{self.total} after {time.perf_counter() - self.start:.1f} s")
            self.next_mark += self.total / 4

    def close(self) -> None:
        if self.total >= 16:
            _log(f"  {self.desc}: {self.done}/{self.total} in {time.perf_counter() - self.start:.1f} s")


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def one_thread(fn):
    """Run ``fn`` with one intra-op thread (CPU figures comparable between runs on a shared machine), then give the
    caller its thread count back: a benchmark called from a test must not change the threads of the tests after it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped
