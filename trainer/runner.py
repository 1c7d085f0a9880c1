"""The training loop shared by stage 1 and stage 2.

A stage supplies a ``TrainingPolicy`` (rollout + reward + ``loss.backward()`` in ``step``); the runner
owns everything around it:

    load data → (resume: restore weights, optimizer, schedule, RNG, data position; trim metrics)
    → per step: seed (run seed, step, rank) → this rank's share of the step's prompts → policy.step
      → all-reduce gradients (mean over processes) → skip the update if any gradient is non-finite
        or all are zero (no group gave a signal)
      → clip → AdamW step → LR schedule → metrics (reduced over processes) → checkpoint every N steps
    → export (main process) → PNG curves → an end-of-run summary in the log (steps run, first → last
      headline metric, time, every file exported).

Logging: every stage's command line calls ``setup_logging`` (one format for all stages: the message for
INFO, ``warning:`` / ``error:`` before the others, ``[rank N]`` under data parallel, where other ranks
show warnings only). Per step the runner logs ``step N/total`` and the headline metrics
(``trainer.metrics.headline_keys``: ``reward/*`` when the policy reports any, else ``loss`` and
``val/*``), then ``kl``, ``clip_frac``, ``grad_norm`` and ``time/step_s`` when present.

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
from vans.progress import format_seconds, progress

from .checkpoint import latest_checkpoint, load_training_state, save_training_state
from .config import save_config
from .data import Sample, load_samples
from .metrics import MetricsLogger, headline_keys, peak_memory_mb, read_metrics, reset_peak_memory

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
    ``loss.backward()``) and return a dict of numbers; it never steps the optimizer.

    Optional, found with ``getattr``: ``name`` (how the end-of-run summary names the run, e.g. "stage 1";
    default "training"); ``extra_state()`` / ``load_extra_state(state)``: a JSON-able dict of per-sample
    state the policy keeps between steps (stage 2's accepted anchors), saved in every checkpoint and given
    back on resume, so a resumed run sees what an uninterrupted one would. Under data parallel every
    process's dict is saved and each gets its own back; a resume with another number of processes gives
    every process the dicts of all merged key by key (so keys must mean the same on every process)."""

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
    _load_policy_state(policy, extra.get("policy_state"), runtime)
    logger.truncate_after(extra["step"])
    log.info("resumed from %s (step %d, data position %s)", path, extra["step"], data_state.get("position"))
    return int(extra["step"])


def _policy_state(policy, runtime: Runtime) -> list[dict] | None:
    """Every process's ``policy.extra_state()`` (rank order), or None for a policy without one."""
    get = getattr(policy, "extra_state", None)
    if get is None:
        return None
    state = dict(get())
    if not runtime.distributed:
        return [state]
    gathered: list[dict] = [None] * runtime.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _load_policy_state(policy, saved: list[dict] | None, runtime: Runtime) -> None:
    load = getattr(policy, "load_extra_state", None)
    if load is None or not saved:
        return
    if len(saved) == runtime.world_size:
        load(dict(saved[runtime.rank]))
        return
    merged: dict = {}
    for state in saved:
        merged.update(state)
    load(merged)


def setup_logging() -> None:
    """The log format of every stage's command line (see the module docstring). Reads the process's rank from
    the launcher's ``RANK`` / ``WORLD_SIZE``; leaves an already configured root logger alone."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(f"[rank {rank}] " if world > 1 else ""))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])


class LogFormatter(logging.Formatter):
    """``message`` for INFO and below, ``warning: message`` / ``error: message`` above, after a prefix."""

    def __init__(self, prefix: str = ""):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return self.prefix + text


def run_training(cfg, policy: TrainingPolicy, *, runtime: Runtime | None = None,
                 samples: list[Sample] | None = None) -> RunResult:
    """Train ``policy`` for ``cfg.run.steps`` steps (``cfg`` has ``run``, ``optim``, ``data`` sections)."""
    started = time.perf_counter()
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
    if runtime.is_main:
        for line in run_summary(result, run.steps, read_metrics(logger.path), time.perf_counter() - started,
                                name=getattr(policy, "name", "training")):
            log.info("%s", line)
    runtime.barrier()
    return result


def run_summary(result: RunResult, steps: int, rows: list[dict], seconds: float, *, name: str = "training"
                ) -> list[str]:
    """The end-of-run report: what ran, how the headline metric moved over the whole run (step 1 to the last
    step in metrics.jsonl, so a resumed run reports its whole history), the time of this invocation, and every
    file the run wrote. Headline: ``reward/total`` or ``reward/total_mean`` when present, else every key
    ``headline_keys`` picks (at most four)."""
    ran = result.last_step - result.first_step + 1
    span = f"steps {result.first_step}-{result.last_step}" if ran > 1 else f"step {result.last_step}"
    resumed = f", resumed after step {result.first_step - 1}" if result.first_step > 1 else ""
    if ran < 1:
        lines = [f"{name}: nothing to run, step {result.last_step} of {steps} was already reached"]
    elif result.finished:
        lines = [f"{name} finished: {span} of {steps}{resumed}, {format_seconds(seconds)}"]
    else:
        lines = [f"{name} stopped after step {result.last_step} of {steps}{resumed}, {format_seconds(seconds)}; "
                 "continue with --resume"]
    names = [k for r in rows for k in r]
    total = [k for k in ("reward/total", "reward/total_mean") if k in names]
    for key in (total or headline_keys(names))[:4]:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            (first_step, first), (last_step, last) = points[0], points[-1]
            lines.append(f"  {key}: {first:.4g} (step {first_step}) -> {last:.4g} (step {last_step})"
                         if last_step != first_step else f"  {key}: {last:.4g} (step {last_step})")
    files = {"metrics": result.out_dir / "metrics.jsonl", "checkpoints": result.out_dir / "checkpoints",
             **({"curves": result.plot} if result.plot else {}),
             **{f"export {kind}": path for kind, path in result.exports.items()}}
    lines.extend(f"  {kind}: {path}" for kind, path in files.items())
    return lines


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
    policy_state = _policy_state(policy, runtime)  # gathered on every process
    if runtime.is_main:
        position = step * run.prompts_per_step
        extra = {"world_size": runtime.world_size, **({"policy_state": policy_state} if policy_state else {})}
        save_training_state(ckpt_dir, step, trainable=policy.trainable_state_dict(), optimizer=optimizer,
                            scheduler=scheduler, data_state={"position": position,
                                                             "epoch": position // max(1, order.count)},
                            extra=extra, keep_last=run.keep_last)
    runtime.barrier()


def _summary(metrics: dict) -> str:
    """The metrics of one step's log line (see the module docstring)."""
    heads = set(headline_keys(metrics))
    keys = [k for k in metrics if k in heads or k.startswith("anchor/")] + ["kl", "clip_frac", "grad_norm",
                                                                           "time/step_s"]
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4g}")
    return " ".join(parts)
