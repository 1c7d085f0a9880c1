"""``python -m vans.bench --only train-efficiency``: stage-2 training efficiency per mode on the tiny models (CPU).

For each stage-2 mode (``MODES``: today's default ``flow_grpo`` + ``all``, Flow-GRPO-Fast ``window``, MixGRPO
``sliding``, DiffusionNFT ``nft``) and each of ``SEEDS`` (run seeds: adapter init, data order, rollout noise):

* train ``trainer.stage2.Stage2Policy`` through ``trainer.runner.run_training`` on the brightness sanity reward
  (``reward.kind=brightness``: the mean pixel value of the decoded rollouts, which the tiny random DiT can move);
* before every optimizer step, evaluate the policy: mean brightness of ``EVAL_ROWS`` ODE samples from fixed noise
  on the first two prompts (``EVAL`` settings, the same for every mode; its seconds are left out of the timing);
* stop at the first evaluation whose gain over the start reaches ``GAIN`` (or after ``MAX_STEPS`` steps).

Printed, in one run: per mode the median over the seeds of the seconds per iteration (the runner's
``time/step_s``), the optimizer steps and the training wall-clock seconds to the gain, on how many seeds the gain
was reached, the ratios to the default, and the per-iteration FLOP projection to the real sizes (1.3B DiT, 13,200
tokens, G 8, K 20, H100) from ``vans.flops.stage2_projection``, labelled as a projection.

On the tiny models the DiT is so small that a forward's cost is mostly fixed per call, not per row: the
branched prefix (one row instead of G) saves little there, while it saves G× at the real size. Every mode runs
at ``video.guidance`` 1 here (the tiny random models' CFG means nothing, and equal guidance isolates the mode);
CFG-free training halves the rows again at the real size (the projection's "guidance 1" rows).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .bench_timing import one_thread

SEEDS = (0, 1, 2, 3, 4)
GAIN = 0.004
"""The fixed reward gain: +0.004 mean brightness (0..1 pixels) of the evaluation samples, about twice the
spread of one group's rollouts at the start (≈ 0.002)."""
MAX_STEPS = 30
EVAL_ROWS = 4
COMMON = ("anchor.source=gt", "reward.kind=brightness", "video.guidance=1.0", "video.width=16", "video.height=16",
          "video.steps=20", "grpo.group_size=8", "run.prompts_per_step=1", "run.save_every=1000", "run.plot=false",
          "optim.lr=6e-3")
MODES = {
    "default: flow_grpo all": (),
    "window (Flow-GRPO-Fast)": ("grpo.step_selection=window",),
    "sliding (MixGRPO)": ("grpo.step_selection=sliding",),
    "nft (DiffusionNFT)": ("grpo.algorithm=nft",),
}
# the vans.flops.stage2_modes row each mode is projected with (CFG 5 as stage2.yaml, and CFG-free)
PROJECTION = {
    "default: flow_grpo all": ("flow_grpo all, CFG (default)", None),
    "window (Flow-GRPO-Fast)": ("window (Fast, branched), CFG", "window (Fast), guidance 1"),
    "sliding (MixGRPO)": ("sliding (MixGRPO), CFG", "sliding (MixGRPO), guidance 1"),
    "nft (DiffusionNFT)": ("nft, CFG rollout, conditional training", "nft, guidance 1, old policy"),
}


class _Reached(Exception):
    """Raised from inside the run once the evaluation shows the gain (ends the run early)."""


class _Probe:
    """The policy, evaluated before each of its steps (after the previous optimizer step); evaluation time is
    recorded apart so that it can be left out of the training wall-clock."""

    def __init__(self, policy, samples, gain: float, max_steps: int):
        self.policy, self.samples, self.gain, self.max_steps = policy, samples, gain, max_steps
        self.evals: list[float] = []
        self.eval_s: list[float] = []
        self.cpu_s: list[float] = []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def evaluate(self) -> float:
        from . import progress

        p = self.policy
        settings = p.cfg.generation_settings()
        settings.noise_level = 0.0
        values = []
        with torch.no_grad(), progress.quiet():
            for sample in self.samples:
                noise = p.generator.initial_noise(EVAL_ROWS, settings, seed=123)
                cond = p.generator.encode_text([sample.caption])
                latents = p.generator.sample(p._context(sample), cond, settings, noise=noise).latents
                values.append(p._decode(latents).mean().item())
        return sum(values) / len(values)

    def step(self, batch, step):
        start = time.perf_counter()
        self.evals.append(self.evaluate())
        self.eval_s.append(time.perf_counter() - start)
        if self.evals[-1] - self.evals[0] >= self.gain or step > self.max_steps:
            raise _Reached
        start = time.process_time()
        try:
            return self.policy.step(batch, step)
        finally:
            self.cpu_s.append(time.process_time() - start)


def train_to_gain(work: Path, models: Path, data: Path, mode: tuple[str, ...], seed: int, *,
                  gain: float = GAIN, max_steps: int = MAX_STEPS, extra: tuple[str, ...] = ()) -> dict:
    """One run of one mode until the gain: {steps, wall_s (training only), s_per_it, reached, gain, spread}."""
    from trainer.config import load_config
    from trainer.data import load_samples
    from trainer.metrics import read_metrics
    from trainer.runner import run_training, setup_runtime
    from trainer.stage2 import Stage2Config, Stage2Policy

    from . import progress
    from .bench import CONFIGS

    out = work / f"run_{time.time_ns()}"
    overrides = [f"models_dir={models}", f"data.path={data}", f"run.out_dir={out}", *COMMON, *mode, *extra,
                 f"run.seed={seed}", f"run.steps={max_steps + 1}"]
    cfg = load_config(Stage2Config, CONFIGS / "stage2_tiny.yaml", overrides)
    runtime = setup_runtime(cfg.run)
    samples = load_samples(data).samples
    probe = _Probe(Stage2Policy(cfg, device=runtime.device, dtype=runtime.dtype, rank=runtime.rank), samples[:2],
                   gain, max_steps)
    try:
        with progress.quiet():
            run_training(cfg, probe, runtime=runtime, samples=samples)
    except _Reached:
        pass
    rows = read_metrics(out)
    # step k's time/step_s includes the evaluation made at its start: left out
    train_s = [r["time/step_s"] - e for r, e in zip(rows, probe.eval_s)]
    reached = probe.evals[-1] - probe.evals[0] >= gain
    return {"steps": len(rows), "cpu_s": sum(probe.cpu_s), "cpu_s_per_it": statistics.median(probe.cpu_s),
            "wall_s": sum(train_s), "wall_s_per_it": statistics.median(train_s), "reached": reached,
            "gain": probe.evals[-1] - probe.evals[0], "spread": rows[0]["reward/brightness_std"]}


@one_thread  # one core per run, the same for every mode (the CPU figures stay comparable)
def bench_train_efficiency(work: Path, seeds=SEEDS, modes=None, gain: float = GAIN, max_steps: int = MAX_STEPS,
                           extra: tuple[str, ...] = (), log=print) -> dict:
    """Every mode on every seed (``train_to_gain``); medians, ratios to the first mode, projection per mode."""
    from trainer.data import write_demo_dataset

    from .fixtures import write_demo_models
    from .flops import stage2_projection

    work = Path(work)
    models = write_demo_models(work / "models")
    data = write_demo_dataset(work / "data", count=4)
    modes = MODES if modes is None else modes
    projection = {row["mode"]: row for row in stage2_projection()}
    out: dict = {"seeds": list(seeds), "gain": gain, "max_steps": max_steps, "common": list(COMMON) + list(extra),
                 "modes": {}}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for seed in seeds:  # seed-major: a load change on a shared machine hits every mode alike
        for name, overrides in modes.items():
            runs[name].append(train_to_gain(work, models, data, overrides, seed, gain=gain, max_steps=max_steps,
                                            extra=extra))
            log(f"train-efficiency {name} seed {seed}: {runs[name][-1]}")
    for name, overrides in modes.items():
        cfg_row, free_row = PROJECTION.get(name, (None, None))
        done = runs[name]
        out["modes"][name] = {
            "overrides": list(overrides), "runs": done,
            # CPU seconds of the process (one thread): what the step costs, whatever else the machine runs
            "s_per_it": statistics.median(r["cpu_s_per_it"] for r in done),
            "wall_s_per_it": statistics.median(r["wall_s_per_it"] for r in done),
            "steps_to_gain": statistics.median(r["steps"] for r in done),
            "wall_to_gain_s": statistics.median(r["cpu_s"] for r in done),
            "reached": sum(r["reached"] for r in done),
            "projected_s_cfg": projection[cfg_row]["projected_s"] if cfg_row else None,
            "projected_s_guidance1": projection[free_row]["projected_s"] if free_row else None,
        }
    first = next(iter(out["modes"].values()))
    for entry in out["modes"].values():
        entry["per_it_speedup"] = first["s_per_it"] / entry["s_per_it"]
        entry["wall_speedup"] = first["wall_to_gain_s"] / entry["wall_to_gain_s"]
        entry["projected_speedup_cfg"] = (first["projected_s_cfg"] / entry["projected_s_cfg"]
                                          if entry["projected_s_cfg"] else None)
        entry["projected_speedup_guidance1"] = (first["projected_s_cfg"] / entry["projected_s_guidance1"]
                                                if entry["projected_s_guidance1"] else None)
    return out


def summary(result: dict) -> str:
    """The table: measured (tiny, CPU, median over the seeds) next to the projection (real size, H100)."""
    n = len(result["seeds"])
    lines = [f"train-efficiency: stage 2 on the tiny models (CPU, 1 thread; seconds = process CPU seconds of the "
             f"training steps, evaluation left out), brightness reward, gain +{result['gain']} within "
             f"{result['max_steps']} steps, median over {n} seeds {result['seeds']}; x = ratio to the first row; "
             "projection = FLOP model at 1.3B / 13,200 tokens / G 8 / K 20 on an H100, per iteration, NOT measured",
             f"{'mode':26} {'s/it':>6} {'x':>5} {'steps':>5} {'s to gain':>9} {'x':>5} {'reached':>7}   "
             f"{'projection s/it CFG 5 (x)':>26} {'guidance 1 (x)':>16}"]
    for name, e in result["modes"].items():
        def proj(s, x):
            return f"{s:7.0f} ({x:4.1f}x)" if s else f"{'-':>14}"
        lines.append(f"{name:26} {e['s_per_it']:6.2f} {e['per_it_speedup']:5.2f} {e['steps_to_gain']:5.0f} "
                     f"{e['wall_to_gain_s']:9.1f} {e['wall_speedup']:5.2f} {e['reached']:>4}/{n}   "
                     f"{proj(e['projected_s_cfg'], e['projected_speedup_cfg'] or 0):>26} "
                     f"{proj(e['projected_s_guidance1'], e['projected_speedup_guidance1'] or 0):>16}")
    return "\n".join(lines)
