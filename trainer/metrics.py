"""Training metrics: one JSONL line per step, TensorBoard when installed, PNG curves at the end.

``metrics.jsonl`` lines are ``{"step": N, "time": unix seconds, <name>: number, ...}``, appended,
flushed and fsynced per step, so a killed run keeps every finished step. After a resume the runner
calls ``truncate_after(step)`` so the file holds one consistent history (no step twice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger("vans.trainer")

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete lines of a metrics file (a torn last line from a kill is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Appends metrics of each step; ``enabled=False`` (non-zero ranks) makes every call a no-op."""

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / METRICS_FILE
        self._tb = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            log.info("TensorBoard is not installed; metrics go to %s only (pip install tensorboard)", self.path)
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot(self, keys: Iterable[str] | None = None, name: str = "reward_curves.png") -> Path | None:
        """PNG of the given metrics (default: ``headline_keys``) against step; None without matplotlib."""
        if not self.enabled:
            return None
        rows = read_metrics(self.path)
        if keys is None:
            keys = sorted(headline_keys(k for r in rows for k in r))
        keys = list(keys)
        if not rows or not keys:
            log.info("no reward or loss metrics to plot in %s", self.path)
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.info("matplotlib is not installed: no reward curves PNG (pip install matplotlib); "
                     "the numbers are in %s", self.path)
            return None
        fig = curves_figure(rows, keys)
        out = self.out_dir / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def headline_keys(names: Iterable[str]) -> list[str]:
    """The keys that say how a run goes, in order of first appearance: every ``reward/*`` key when there is
    one (the GRPO stages), else ``loss`` and every ``val/*`` key (a supervised stage)."""
    names = list(dict.fromkeys(names))
    rewards = [k for k in names if k.startswith("reward/")]
    return rewards or [k for k in names if k == "loss" or k.startswith("val/")]


def curves_figure(rows: list[dict], keys: list[str]):
    """A matplotlib figure with one panel per key against the step; steps are whole numbers, so the x ticks
    are too (``MaxNLocator(integer=True)``: a 3-step run shows 1, 2, 3, never 1.25)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), lw=1)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    except ImportError:
        return float("nan")
