"""The training loop shared by stage 1 and stage 2.

A stage supplies a ``TrainingPolicy`` (rollout + reward + ``loss.backward()`` in ``step``); the runner
owns everything around it:

    load data → (resume: restore weights, optimizer, schedule, RNG, data position; trim metrics)
    → per step: seed (run seed, step, rank) → this rank's share of the step's prompts → policy.step
      → all-reduce gradients (mean over processes) → skip the update if any gradient is non-finite
        or all are zero (no group gave a signal)
      → clip → AdamW step → LR schedule → metrics (reduced over processes) → checkpoint every N steps
    → export (main process) → PNG curves.

Exact resume: every step reseeds python/numpy/torch from (seed, step, rank) and the data order is a
pure function of (seed, epoch), so a resumed run draws the same rollouts as an uninterrupted one; on
CPU its metrics are identical. A checkpoint is only written between steps, atomically.

Data parallel: under ``accelerate launch`` (or torchrun) each process holds a full policy, takes
prompts ``rank::world`` of the step's ``run.prompts_per_step``, computes advantages within its own
groups (a group never spans processes) and its gradients are averaged with one all-reduce before the
optimizer step, so every process applies the same update. Metrics are averaged over processes, except
keys starting with ``count/`` or ``groups/`` (summed), keys ending in ``_min`` (minimum), keys ending in
``_max`` or ``mismatch`` and ``mem/`` keys (maximum), and the update counts decided after the all-reduce
(``SHARED_KEYS``, the same on every process: reported once). If ``policy.step`` raises on any process,
every process raises before the gradient all-reduce (the others name the failing rank) instead of
waiting in it forever.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from vans.errors import InputError, VansError
from vans.progress import progress

from .checkpoint import latest_checkpoint, load_training_state, save_training_state
from .config import save_config
from .data import Sample, load_samples
from .metrics import MetricsLogger, peak_memory_mb, reset_peak_memory

log = logging.getLogger("vans.trainer")

SUM_PREFIXES = ("count/", "groups/")
# decided after the gradient all-reduce, hence equal on every process: reported once, never summed
SHARED_KEYS = ("count/skipped_updates", "count/no_signal_updates")
MIN_SUFFIXES = ("_min",)
MAX_SUFFIXES = ("_max", "mismatch")  # "abs_max" ends in "_max"


def reduce_metric_values(gathered: list[dict]) -> dict:
    """One metrics dict from every process's dict (see the module docstring for the rule per key).
    Non-numeric values are dropped; means, minima and maxima ignore non-finite values."""
    out = {}
    for key in dict.fromkeys(k for m in gathered for k in m):
        values = [m[key] for m in gathered if isinstance(m.get(key), (int, float))]
        if not values:
            continue
        finite = [v for v in values if math.isfinite(v)]
        if key in SHARED_KEYS:
            out[key] = max(values)
        elif key.startswith(SUM_PREFIXES):
            out[key] = sum(values)
        elif key.startswith("mem/") or key.endswith(MAX_SUFFIXES):
            out[key] = max(finite) if finite else float("nan")
        elif key.endswith(MIN_SUFFIXES):
            out[key] = min(finite) if finite else float("nan")
        else:
            out[key] = sum(finite) / len(finite) if finite else float("nan")
    return out


class TrainingPolicy(Protocol):
    """What a stage implements. ``step`` must leave gradients in the trainable parameters (it calls
    ``loss.backward()``) and return a dict of numbers; it never steps the optimizer."""

    memory_settings: Sequence[str]  # config keys to lower when a step runs out of memory

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None: ...

    def step(self, batch: list[Sample], step: int) -> dict[str, float]: ...

    def export(self, out_dir: Path) -> dict[str, str]: ...


# ----------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors in place over processes with one flat all-reduce."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n

    def reduce_metrics(self, metrics: dict) -> dict:
        if not self.distributed:
            return metrics
        gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, metrics)
        return reduce_metric_values(gathered)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from vans.pipeline import pick_dtype

    try:
        return pick_dtype(device, name)
    except KeyError:
        raise InputError(f"run.dtype '{name}' is not known; use auto, bf16, fp16 or fp32") from None


def setup_runtime(run_cfg) -> Runtime:
    """Single process, or one process of ``accelerate launch`` / torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=run_cfg.device == "cpu")
        device = accelerator.device
        return Runtime(device=device, dtype=_dtype(run_cfg.dtype, device), rank=accelerator.process_index,
                       world_size=accelerator.num_processes, accelerator=accelerator)
    from vans.pipeline import pick_device

    device = pick_device(run_cfg.device)
    return Runtime(device=device, dtype=_dtype(run_cfg.dtype, device))


# ----------------------------------------------------------------------------------------------------
# Determinism


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def seed_everything(value: int) -> None:
    random.seed(value)
    try:
        import numpy as np

        np.random.seed(value % 2**32)
    except ImportError:
        pass
    torch.manual_seed(value)


class DataOrder:
    """Global sample order: a seeded permutation per epoch (or the file order), a pure function of
    (seed, epoch), so position ``p`` maps to the same sample in every run and after every resume."""

    def __init__(self, count: int, seed: int, shuffle: bool):
        self.count, self.seed, self.shuffle = count, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.count, generator=torch.Generator().manual_seed(
                self.seed * 7_919 + epoch)).tolist()}
        return self._perms[epoch][offset]

    def step_indices(self, step: int, per_step: int) -> list[int]:
        start = (step - 1) * per_step
        return [self.index(start + j) for j in range(per_step)]


# ----------------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(params: list[torch.nn.Parameter], optim_cfg, total_steps: int):
    if not params:
        raise InputError("the policy has no trainable parameters; check the LoRA settings")
    if optim_cfg.schedule not in ("constant", "cosine"):
        raise InputError(f"optim.schedule '{optim_cfg.schedule}' is not known; use constant or cosine")
    betas = tuple(float(b) for b in optim_cfg.betas)
    optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=betas, weight_decay=optim_cfg.weight_decay)
    warmup, cosine = max(0, optim_cfg.warmup), optim_cfg.schedule == "cosine"

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cosine:
            progress_ = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress_))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunResult:
    out_dir: Path
    first_step: int
    last_step: int
    finished: bool
    exports: dict = field(default_factory=dict)
    plot: Path | None = None


def _check(cfg, runtime: Runtime, count: int) -> None:
    run = cfg.run
    if run.steps < 1:
        raise InputError(f"run.steps is {run.steps}; use at least 1")
    if run.save_every < 1:
        raise InputError(f"run.save_every is {run.save_every}; use at least 1")
    if run.prompts_per_step < 1 or run.prompts_per_step % runtime.world_size:
        raise InputError(f"run.prompts_per_step is {run.prompts_per_step} with {runtime.world_size} processes; "
                         f"use a positive multiple of {runtime.world_size}")


def _resume(cfg, policy, optimizer, scheduler, ckpt_dir: Path, logger: MetricsLogger, runtime: Runtime) -> int:
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        log.info("no checkpoint in %s: starting from step 0", ckpt_dir)
        logger.truncate_after(0)
        return 0
    trainable, data_state, extra = load_training_state(path, optimizer, scheduler)
    saved = extra.get("world_size")
    if saved is not None and int(saved) != runtime.world_size:
        message = (f"checkpoint {path} was saved with {saved} processes and this run has {runtime.world_size}; "
                   "the data split and the per-process seeds differ, so the resume is not exact")
        if not cfg.run.allow_world_size_change:
            raise InputError(f"{message}; launch {saved} processes or set run.allow_world_size_change=true")
        log.warning("%s (allowed by run.allow_world_size_change)", message)
    policy.load_trainable_state_dict(trainable)
    logger.truncate_after(extra["step"])
    log.info("resumed from %s (step %d, data position %s)", path, extra["step"], data_state.get("position"))
    return int(extra["step"])


def run_training(cfg, policy: TrainingPolicy, *, runtime: Runtime | None = None,
                 samples: list[Sample] | None = None) -> RunResult:
    """Train ``policy`` for ``cfg.run.steps`` steps (``cfg`` has ``run``, ``optim``, ``data`` sections)."""
    runtime = runtime or setup_runtime(cfg.run)
    run = cfg.run
    out_dir = Path(run.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if samples is None:
        report = load_samples(cfg.data.path, cfg.data.video_root or None, check_videos=cfg.data.check_videos,
                              max_samples=cfg.data.max_samples)
        samples = report.samples
    _check(cfg, runtime, len(samples))
    if not run.resume and latest_checkpoint(ckpt_dir) is not None:
        raise InputError(f"{out_dir} already holds checkpoints; pass --resume to continue, or set run.out_dir "
                         "to a new folder")
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if run.resume:
            _warn_changed_settings(cfg, out_dir / "config.yaml")
        save_config(cfg, out_dir / "config.yaml")
    runtime.barrier()

    params = list(policy.trainable_parameters())
    optimizer, scheduler = make_optimizer(params, cfg.optim, run.steps)
    logger = MetricsLogger(out_dir, enabled=runtime.is_main, tensorboard=run.tensorboard)
    start = 0
    if run.resume:
        start = _resume(cfg, policy, optimizer, scheduler, ckpt_dir, logger, runtime)
    else:
        logger.truncate_after(0)
    order = DataOrder(len(samples), run.seed, cfg.data.shuffle)
    end = min(run.steps, run.stop_at) if run.stop_at else run.steps
    last = start
    try:
        with progress(max(0, end - start), "training") as bar:
            for step in range(start + 1, end + 1):
                metrics = _one_step(cfg, policy, runtime, optimizer, scheduler, params, order, samples, step)
                logger.log(step, metrics)
                if runtime.is_main and (step % run.log_every == 0 or step == end):
                    log.info("step %d/%d %s", step, run.steps, _summary(metrics))
                bar.update()
                last = step
                if step % run.save_every == 0 or step == end:
                    _save(policy, optimizer, scheduler, ckpt_dir, step, order, run, runtime)
    finally:
        logger.close()
    result = RunResult(out_dir=out_dir, first_step=start + 1, last_step=last, finished=last >= run.steps)
    if result.finished and runtime.is_main:
        result.exports = policy.export(out_dir / "export") or {}
        if run.plot:
            result.plot = MetricsLogger(out_dir, enabled=True, tensorboard=False).plot()
    runtime.barrier()
    return result


# keys a resumed run may change on purpose
_RESUME_KEYS = ("run.resume", "run.steps", "run.stop_at", "run.log_every", "run.save_every", "run.plot",
                "run.tensorboard", "run.allow_world_size_change")


def _warn_changed_settings(cfg, saved_path: Path) -> None:
    """A resumed run continues with the settings it is given; say loudly which differ from the saved run (a
    default that changed between versions, a forgotten --set), since the continuation is then another run."""
    import yaml

    from .config import config_to_dict

    if not saved_path.is_file():
        return

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    try:
        saved = dict(flat(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}))
    except (OSError, yaml.YAMLError):
        return
    now = dict(flat(config_to_dict(cfg)))
    changed = [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in sorted(set(saved) | set(now))
               if k not in _RESUME_KEYS and saved.get(k) != now.get(k)]
    if changed:
        log.warning("resuming with %d setting(s) that differ from the saved run (%s): %s", len(changed), saved_path,
                    "; ".join(changed[:12]) + (" …" if len(changed) > 12 else ""))


def _one_step(cfg, policy, runtime: Runtime, optimizer, scheduler, params, order: DataOrder,
              samples: list[Sample], step: int) -> dict:
    run = cfg.run
    seed_everything(step_seed(run.seed, step, runtime.rank))
    indices = order.step_indices(step, run.prompts_per_step)
    batch = [samples[i] for i in indices[runtime.rank::runtime.world_size]]
    optimizer.zero_grad(set_to_none=True)
    reset_peak_memory(runtime.device)
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        metrics = dict(policy.step(batch, step))
    except Exception as exc:
        error = exc
        if _is_oom(exc):
            settings = ", ".join(list(getattr(policy, "memory_settings", ())) + ["run.prompts_per_step"])
            error = InputError(f"out of memory at step {step} on {runtime.device}; lower {settings} "
                               "(or use a GPU with more memory)")
    _raise_if_any_failed(runtime, error, step)
    t_opt = time.perf_counter()
    grads = _grads(params)
    runtime.all_reduce_mean(grads)
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    # No group on any process gave a signal (zero reward spread, NaN rewards): an AdamW step on zero
    # gradients would still move the weights through its momentum, so make none.
    silent = finite and not any(bool(g.any()) for g in grads)
    metrics["count/skipped_updates"] = int(not finite)
    metrics["count/no_signal_updates"] = int(silent)
    grad_norm = float("nan") if not finite else 0.0
    if finite and not silent:
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
    elif not finite:
        log.warning("step %d: non-finite gradient, update skipped", step)
    optimizer.zero_grad(set_to_none=True)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    scheduler.step()
    metrics["grad_norm"] = grad_norm
    metrics["time/optim_s"] = time.perf_counter() - t_opt
    metrics["time/step_s"] = time.perf_counter() - start
    metrics["mem/peak_mb"] = peak_memory_mb(runtime.device)
    metrics["data/epoch"] = ((step - 1) * run.prompts_per_step) // max(1, order.count)
    return runtime.reduce_metrics(metrics)


def _raise_if_any_failed(runtime: Runtime, error: BaseException | None, step: int) -> None:
    """Raise on every process when ``policy.step`` failed on any (before the gradient all-reduce, which
    would otherwise wait forever for the failed process): the failed one raises its own error."""
    failed = [runtime.rank] if error is not None else []
    if runtime.distributed:
        flags = torch.zeros(runtime.world_size, device=runtime.device)
        flags[runtime.rank] = float(error is not None)
        torch.distributed.all_reduce(flags)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
    if error is not None:
        raise error
    if failed:
        message = f"rank {failed[0]} failed at step {step}: see its log"
        log.error("%s", message)
        raise VansError(message)


def _save(policy, optimizer, scheduler, ckpt_dir: Path, step: int, order: DataOrder, run, runtime: Runtime) -> None:
    if runtime.is_main:
        position = step * run.prompts_per_step
        save_training_state(ckpt_dir, step, trainable=policy.trainable_state_dict(), optimizer=optimizer,
                            scheduler=scheduler, data_state={"position": position,
                                                             "epoch": position // max(1, order.count)},
                            extra={"world_size": runtime.world_size}, keep_last=run.keep_last)
    runtime.barrier()


def _summary(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith(("reward/", "anchor/"))] + ["kl", "clip_frac", "grad_norm", "time/step_s"]
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4g}")
    return " ".join(parts)
