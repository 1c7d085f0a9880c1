"""The stage-1 half of ``python -m vans.bench --only train-efficiency``: render economy on the tiny models (CPU).

Stage 1 renders every caption of every group only to rank the G captions of one prompt by CLIP-V. For each render
setting (``SETTINGS``: today's 20 guided steps per prompt, then each saving alone and together) and each of
``SEEDS`` (run seeds: adapter init, captions, render noise), on ``STEPS`` steps of ``PROMPTS`` prompts:

* the policy samples its G captions per prompt once (``Stage1Policy._sample_group``), so that every setting renders
  the SAME captions;
* each setting renders them (``Stage1Policy.render`` after ``set_render``) and scores them (CLIP-V against the GT
  clip, then the stage-1 reward and its advantages); its DiT calls and rows come from the generator's counters;
* per group, the Spearman rank correlation of the setting's CLIP-V, and of its total-reward advantages, with
  today's render of the same captions, and whether the best caption is the same (top-1).

Seconds per step = the rollout (captions) + the setting's render and scoring + the GRPO update, each measured in
process CPU seconds on one thread; the rollout and the update are the same work for every setting and are measured
once per step. The projection prices a step's DiT rows at the real size (13,200 tokens, 1.3B) at the H100 rate of
``vans.flops``, with 8 prompts of G 8 as stage1.yaml: a FLOP model, not a measurement, and renders only (the VLM's
rollout and update come on top).

The tiny models have random weights: their rankings say whether the mechanics keep the order of the full render
(same captions, same noise, fewer or unguided steps), not how a trained Wan2.1 ranks real captions.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from .bench_timing import one_thread

SEEDS = (0, 1, 2, 3, 4)
STEPS = 2
PROMPTS = 4
GROUP = 8
COMMON = ("rollout.group_size=8", f"run.prompts_per_step={PROMPTS}", "rollout.max_new_tokens=8",
          "render.width=16", "render.height=16", "render.num_frames=5", "render.num_context=1")
TODAY = {"steps": 20, "guidance": 5.0, "scope": "prompt", "reuse": False, "batch": GROUP}
SETTINGS = {
    "today: 20 steps, CFG 5, per prompt": {},
    "today, other initial noise": {"other_noise": True},
    "reuse (exact)": {"reuse": True},
    "one DiT batch per step": {"scope": "step", "batch": PROMPTS * GROUP},
    "10 steps": {"steps": 10},
    "CFG off": {"guidance": 1.0},
    "10 steps, CFG off": {"steps": 10, "guidance": 1.0},
    "fast: stage1_fast.yaml": {"steps": 10, "guidance": 1.0, "scope": "step", "batch": 16, "reuse": True},
    "5 steps, CFG off": {"steps": 5, "guidance": 1.0},
}
"""Each setting: ``render`` keys changed from ``TODAY``. "fast" is trainer/configs/stage1_fast.yaml's render.
"other initial noise" is today's render from another draw of the group's shared noise: the agreement a ranking has
with itself, the yardstick for the others' rho (``other_noise`` is not a render key: the run seed that draws the
noise is moved for that setting)."""


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties get their average rank); NaN when either
    has no spread (a ranking without order)."""
    def ranks(values):
        values = [float(v) for v in values]
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


def _score(policy, groups, step):
    """Render and score the groups with the policy's current render setting: (clip_v per group, advantages per
    group, CPU seconds, DiT calls, DiT rows)."""
    gen = policy.generator
    calls, rows = gen.dit_calls, gen.dit_rows
    start = time.process_time()
    clip_v = policy._clip_v(groups, step)
    rewards = [policy.rewards(sample, group, v) for (sample, group), v in zip(groups, clip_v)]
    seconds = time.process_time() - start
    gen.clear_text_cache()
    return clip_v, [r["advantages"] for r in rewards], rewards, seconds, gen.dit_calls - calls, gen.dit_rows - rows


def _update_seconds(policy, groups, rewards) -> float:
    """CPU seconds of the GRPO update on these groups (as ``Stage1Policy.step``; the gradients are dropped)."""
    start = time.process_time()
    for (_, group), reward in zip(groups, rewards):
        if reward["advantages"].abs().gt(0).any():
            loss, _, _ = policy.group_loss(group, reward["advantages"])
            (loss / len(groups)).backward()
    for p in policy.trainable_parameters():
        p.grad = None
    return time.process_time() - start


@one_thread
def bench_render_economy(work: Path, seeds=SEEDS, settings=None, steps: int = STEPS, log=print) -> dict:
    """Every render setting on the same captions, per seed; medians and ratios to the first setting."""
    from trainer.config import load_config
    from trainer.data import load_samples, write_demo_dataset
    from trainer.runner import setup_runtime
    from trainer.stage1 import Stage1Config, Stage1Policy

    from . import progress
    from .bench import CONFIGS
    from .fixtures import write_demo_models
    from .flops import H100_CFG_STEP_S, dit_forward_flops

    work = Path(work)
    models = write_demo_models(work / "models")
    data = write_demo_dataset(work / "data", count=PROMPTS)
    samples = load_samples(data).samples[:PROMPTS]
    settings = SETTINGS if settings is None else settings
    per: dict[str, dict[str, list]] = {name: {"s": [], "render_s": [], "calls": [], "rows": [], "rho_clip_v": [],
                                              "rho_total": [], "top1": [], "no_order": 0} for name in settings}
    for seed in seeds:
        cfg = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml",
                          [f"models_dir={models}", f"data.path={data}", f"run.out_dir={work / 'run'}", *COMMON,
                           f"run.seed={seed}"])
        policy = Stage1Policy(cfg, setup_runtime(cfg.run))
        base = dataclasses.replace(cfg.render, **TODAY)
        for step in range(steps):
            torch.manual_seed(seed * 1000 + step)
            start = time.process_time()
            with progress.quiet():
                groups = [(sample, policy._sample_group(sample)) for sample in samples]
            rollout_s = time.process_time() - start
            scored = {}
            for name, changes in settings.items():
                changes = dict(changes)
                other = changes.pop("other_noise", False)
                policy.set_render(dataclasses.replace(base, **changes))
                cfg.run.seed = seed + 7919 if other else seed
                with progress.quiet():
                    scored[name] = _score(policy, groups, step)
                cfg.run.seed = seed
            update_s = _update_seconds(policy, groups, scored[next(iter(settings))][2])
            ref_clip, ref_adv = scored[next(iter(settings))][:2]
            for name, (clip_v, adv, _, seconds, calls, rows) in scored.items():
                e = per[name]
                e["s"].append(rollout_s + seconds + update_s)
                e["render_s"].append(seconds)
                e["calls"].append(calls)
                e["rows"].append(rows)
                for c, rc, a, ra in zip(clip_v, ref_clip, adv, ref_adv):
                    rho = spearman(c, rc)
                    if rho != rho:  # no order in one of the two rankings: not comparable
                        e["no_order"] += 1
                    else:
                        e["rho_clip_v"].append(rho)
                        e["top1"].append(float(int(torch.argmax(c)) == int(torch.argmax(rc))))
                    rho_total = spearman(a, ra)
                    if rho_total == rho_total:
                        e["rho_total"].append(rho_total)
            log(f"render-economy seed {seed} step {step}: " + ", ".join(
                f"{n}: {per[n]['rows'][-1]} rows {per[n]['render_s'][-1]:.2f} s" for n in settings))
    row_s = dit_forward_flops(1, 13_200) / (dit_forward_flops(2, 13_200) / H100_CFG_STEP_S)
    out: dict = {"seeds": list(seeds), "steps": steps, "prompts": PROMPTS, "group": GROUP, "today": TODAY,
                 "common": list(COMMON), "settings": {}}
    for name, e in per.items():
        rows_per_prompt = statistics.median(e["rows"]) / PROMPTS
        out["settings"][name] = {
            "changes": settings[name], "s_per_step": statistics.median(e["s"]),
            "render_s_per_step": statistics.median(e["render_s"]),
            "dit_calls": statistics.median(e["calls"]), "dit_rows": statistics.median(e["rows"]),
            "spearman_clip_v": statistics.mean(e["rho_clip_v"]) if e["rho_clip_v"] else float("nan"),
            "spearman_total": statistics.mean(e["rho_total"]) if e["rho_total"] else float("nan"),
            "top1": statistics.mean(e["top1"]) if e["top1"] else float("nan"),
            "groups": len(e["rho_clip_v"]), "no_order": e["no_order"],
            # the same setting at the real size: 8 prompts × G 8 (the rows scale with G, the steps and CFG)
            "projected_render_s": rows_per_prompt * 8 * row_s,
        }
    first = next(iter(out["settings"].values()))
    for entry in out["settings"].values():
        entry["calls_ratio"] = first["dit_calls"] / entry["dit_calls"]
        entry["rows_ratio"] = first["dit_rows"] / entry["dit_rows"]
        entry["speedup"] = first["s_per_step"] / entry["s_per_step"]
    return out


def summary(result: dict) -> str:
    n = len(result["seeds"])
    lines = [f"train-efficiency, stage 1 render economy: tiny models (CPU, 1 thread, process CPU seconds), "
             f"{result['prompts']} prompts x G {result['group']} per step, {result['steps']} steps x {n} seeds "
             f"{result['seeds']}, every setting on the same captions; x = ratio to the first row; rho = Spearman "
             "of the reward ranking with the first row's render (mean over groups; random weights: a mechanics "
             "check only); projection = the step's renders at 1.3B / 13,200 tokens / 8 prompts x G 8 on an H100, "
             "FLOP model, NOT measured",
             f"{'render setting':36} {'s/step':>6} {'x':>5} {'DiT calls':>9} {'x':>5} {'rows':>5} {'x':>5} "
             f"{'rho CLIP-V':>10} {'rho total':>9} {'top-1':>5}   {'projection s':>12}"]
    for name, e in result["settings"].items():
        lines.append(f"{name:36} {e['s_per_step']:6.2f} {e['speedup']:5.2f} {e['dit_calls']:9.0f} "
                     f"{e['calls_ratio']:5.2f} {e['dit_rows']:5.0f} {e['rows_ratio']:5.2f} "
                     f"{e['spearman_clip_v']:10.3f} {e['spearman_total']:9.3f} {e['top1']:5.2f}   "
                     f"{e['projected_render_s']:12.0f}")
    return "\n".join(lines)
