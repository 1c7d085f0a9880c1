"""Flow-GRPO for stage 2: which SDE steps are actions, their recomputed log-probs, and the clipped loss.

The math is ``vans.sampling``'s (Flow-GRPO, Liu et al. 2025): a rollout is ``sample_flow`` with ``noise_level`` > 0, which
stores for each kept step i the state x_i, the sampled x_{i+1} and log p_old(x_{i+1} | x_i) (a mean over
the elements of the target latents). Training recomputes the same transition with gradient through the
one model call (``VideoGenerator.model_velocity`` via ``guided_velocity``) with ``prev_sample`` = the stored
x_{i+1}, so before any update the ratio r = exp(log p_θ − log p_old) is exactly 1 (the on-policy sanity check).

Loss per trained step, averaged over samples (Flow-GRPO):
    max(−Â·r, −Â·clip(r, 1 − ε, 1 + ε)) + β·KL(μ_θ ‖ μ_ref),
with KL between the two Gaussian steps of equal covariance (``vans.sampling.gaussian_step_kl``: mean over
elements of ‖μ_θ − μ_ref‖² / (2·std²)), ε = 1e-3 and β = 0.004 (VANS / Flow-GRPO Wan). Advantages come
from ``vans.rewards.group_advantages`` and are clipped to ±``adv_clip``.

Step selection (``plan_steps``; the chosen steps are shared by the whole group, so advantages are not
confounded by step difficulty):

* ``all`` — SDE at every step, train every step but the last, K − 1 steps (the Flow-GRPO trainer trains
  ``int(K · timestep_fraction)`` steps with ``timestep_fraction = 0.99``, i.e. it never trains the final σ → 0
  transition). The paper's method and the default; the most DiT calls.
* ``fraction`` — SDE everywhere, train a random subset of ⌊K·fraction⌋ steps (DanceGRPO).
* ``window`` — Flow-GRPO-Fast as its README describes it and its first version implements it (flow_grpo
  ``sd3_pipeline_with_logprob_s1.py``, ``scripts/train_sd3_s1.py``): one ODE trajectory per prompt up to the
  branch step b (``StepPlan.branch_at``), drawn uniformly per group inside the ``window`` range; there the group
  branches into G rows, SDE for ``window_size`` steps (the only trained ones), ODE after. The README reports
  2 trained steps as good as all 10 per epoch on PickScore. Use it when the budget is tight: the cheapest
  likelihood-ratio mode, and the group's spread comes from the window's SDE draws only (clean credit assignment).
  (flow_grpo's later ``sde_window_*`` refactor samples G independent noises, i.e. no shared prefix.)
* ``sliding`` — MixGRPO (arXiv 2507.21802; Tencent-Hunyuan/MixGRPO ``fastvideo/utils/grpo_states.py``,
  strategy ``progressive`` with overlap and roll-back): a window of ``window_size`` SDE + trained steps (MixGRPO 4)
  whose start moves by ``slide_stride`` (1) every ``slide_every`` (25) optimizer steps from step 0 up to K − 2, then
  rolls back to 0; ODE elsewhere; the group shares one noise, so the prefix is branched as for ``window``. The
  start is a pure function of the optimizer step (``sliding_start``), so a resumed run replays it. MixGRPO reports
  about 50 % less training time than DanceGRPO; use it to train every noise level over a run at a window's cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vans.errors import InputError
from vans.rewards import group_advantages
from vans.sampling import VelocityFn, flow_sigmas, gaussian_step_kl, sde_step_logprob

STEP_SELECTIONS = ("all", "fraction", "window", "sliding")


@dataclass
class StepPlan:
    """Which steps of a K-step rollout are stochastic (``sde_steps``; None = all) and which are trained.

    ``branch_at``: the rollout shares one trajectory per group before this step and branches into the G rows
    there (``vans.sampling.sample_flow(branch_at=…, branch_size=G)`` with one initial noise); None = G rows
    from the start."""

    sde_steps: list[int] | None
    train_steps: list[int]
    branch_at: int | None = None


def sliding_start(step: int, num_steps: int, *, slide_every: int = 25, slide_stride: int = 1) -> int:
    """MixGRPO's progressive window start after ``step`` optimizer steps: s·(⌊step / every⌋ mod (⌊(K − 2)/s⌋ + 1)).

    The closed form of ``GRPOTrainingStates.update_iteration`` (MixGRPO ``grpo_states.py``): the start grows by s
    every ``slide_every`` iterations and rolls back to 0 once it passes ``max_timesteps`` = K − 2; s = 0 keeps it
    at 0."""
    if slide_every < 1:
        raise InputError(f"slide_every={slide_every}: must be at least 1 optimizer step")
    if slide_stride < 0:
        raise InputError(f"slide_stride={slide_stride}: must be >= 0")
    if step < 0:
        raise InputError(f"step={step}: must be >= 0")
    if slide_stride == 0:
        return 0
    positions = max(0, num_steps - 2) // slide_stride + 1
    return slide_stride * ((step // slide_every) % positions)


def window_starts(num_steps: int, window: tuple[float, float], window_size: int) -> tuple[int, int, int]:
    """(window size, first, last start) of ``window``: starts are drawn uniformly from first … last (inclusive)."""
    lo, hi = window
    if not 0 <= lo < hi <= 1:
        raise InputError(f"window={list(window)}: need 0 <= start < end <= 1 (fractions of the steps, 0 = pure noise)")
    size = max(1, min(int(window_size), num_steps))
    first = min(int(math.floor(lo * num_steps)), num_steps - size)
    last = max(first, min(int(math.ceil(hi * num_steps)) - size, num_steps - size))
    return size, first, last


def plan_steps(num_steps: int, selection: str = "all", *, fraction: float = 1.0,
               window: tuple[float, float] = (0.0, 0.5), window_size: int = 2,
               generator: torch.Generator | None = None, step: int = 0, slide_every: int = 25,
               slide_stride: int = 1) -> StepPlan:
    """Draw the SDE / trained steps for one group (see the module docstring).

    ``generator`` draws the random choices (``fraction``, ``window``); ``step`` (optimizer steps done) alone
    fixes ``sliding``."""
    if num_steps < 1:
        raise InputError(f"steps={num_steps}: a rollout needs at least one step")
    if selection == "all":  # all but the last step (Flow-GRPO: int(K · 0.99)); one step: that step
        return StepPlan(None, list(range(max(1, num_steps - 1))))
    if selection == "fraction":
        if not 0 < fraction <= 1:
            raise InputError(f"train_fraction={fraction}: must be in (0, 1]")
        count = max(1, math.floor(num_steps * fraction))
        picked = torch.randperm(num_steps, generator=generator)[:count]
        return StepPlan(None, sorted(int(i) for i in picked))
    if selection == "window":
        size, first, last = window_starts(num_steps, window, window_size)
        start = first + int(torch.randint(last - first + 1, (1,), generator=generator))
        steps = list(range(start, start + size))
        return StepPlan(steps, steps, branch_at=start)
    if selection == "sliding":
        # MixGRPO ends the window at its max_timesteps (K − 2) exclusive, so a start of K − 2 gives an empty window;
        # here the window ends before the last step K − 1 as ``all`` does (never the σ → 0 transition), so every
        # start MixGRPO visits trains at least one step.
        if window_size < 1:
            raise InputError(f"window_size={window_size}: must be at least 1")
        start = sliding_start(step, num_steps, slide_every=slide_every, slide_stride=slide_stride)
        steps = list(range(start, max(start + 1, min(start + int(window_size), num_steps - 1))))
        return StepPlan(steps, steps, branch_at=start)
    raise InputError(f"step selection {selection!r}: use one of {', '.join(STEP_SELECTIONS)}")


def sigma_cap(num_steps: int, shift: float) -> float:
    """The σ used instead of 1 in the SDE std at the first step, exactly as ``sample_flow`` picks it."""
    return float(flow_sigmas(num_steps, shift)[1]) if num_steps > 1 else 0.5


def advantages(rewards: torch.Tensor, group_size: int, adv_clip: float = 5.0) -> torch.Tensor:
    """Per-group normalised rewards, clipped to ±adv_clip; a group with no spread is exactly 0."""
    return group_advantages(rewards, group_size).clamp(-adv_clip, adv_clip)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [num_groups]: groups whose rewards are all equal (no preference, no gradient: they are skipped)."""
    grouped = torch.as_tensor(rewards).reshape(-1, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def step_logprob(velocity: VelocityFn, x: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor,
                 sigma_next: torch.Tensor, *, noise_level: float, cap: float, model_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob [B] of the stored transition x → x_next under the current model, with its mean and std.

    ``x`` is fed to the model in ``model_dtype`` exactly as ``sample_flow`` fed it during the rollout.
    """
    v = velocity(x.to(model_dtype), sigma)
    _, logprob, mean, std = sde_step_logprob(x, v, sigma, sigma_next, noise_level=noise_level, sigma_cap=cap,
                                             prev_sample=x_next)
    if logprob is None:
        raise InputError("noise_level=0 makes every step deterministic: Flow-GRPO needs noise_level > 0 (e.g. 0.7)")
    return logprob, mean, std


def clipped_policy_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, adv: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip per sample: (loss [B], ratio [B], clipped [B] bool)."""
    ratio = torch.exp(logprob - old_logprob.to(logprob))
    adv = adv.to(logprob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, (ratio - 1.0).abs() > clip_range


def flow_grpo_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, adv: torch.Tensor, *, clip_range: float,
                   beta: float, mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over samples of the clipped policy loss + β·KL. Returns (loss, detached per-sample stats)."""
    policy, ratio, clipped = clipped_policy_loss(logprob, old_logprob, adv, clip_range)
    loss = policy.mean()
    kl = torch.zeros_like(policy)
    if beta > 0:
        if ref_mean is None or mean is None or std is None:
            raise InputError("beta > 0 needs the reference step mean; pass mean, ref_mean and std")
        kl = gaussian_step_kl(mean, ref_mean, std)
        loss = loss + beta * kl.mean()
    stats = {"policy_loss": policy.detach(), "ratio": ratio.detach(), "clipped": clipped.detach().float(),
             "kl": kl.detach(), "approx_kl": 0.5 * (logprob - old_logprob.to(logprob)).detach() ** 2}
    return loss, stats


def train_on_rollout(velocity: VelocityFn, rollout, train_steps: list[int], adv: torch.Tensor, *,
                     noise_level: float, cap: float, model_dtype: torch.dtype, clip_range: float, beta: float,
                     reference=None, loss_scale: float = 1.0, micro_batch: int = 0) -> dict[str, list[float]]:
    """Backward the Flow-GRPO loss of one group's stored rollout (``vans.sampling.SampleResult`` with the
    ``train_steps`` kept), one trained step (and micro-batch) at a time so only one graph lives at once.

    ``reference``: a zero-argument callable returning a context manager inside which ``velocity`` computes
    the reference policy (needed when ``beta`` > 0). ``loss_scale`` divides the sum over steps and groups
    into a mean. ``micro_batch`` rows per forward (0 = the whole group, the rollout's own batch size, which
    keeps the first ratio exactly 1). Returns per-step lists of detached statistics.
    """
    sigmas = rollout.sigmas
    rows = adv.shape[0]
    chunk = rows if micro_batch <= 0 else min(micro_batch, rows)
    stats: dict[str, list[float]] = {}
    for i in train_steps:
        if i not in rollout.logprobs:
            raise InputError(f"step {i} was not stored as an SDE step of the rollout; keep_steps must hold the trained steps")
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            x, x_next = rollout.states[i][part], rollout.next_states[i][part]
            ref_mean = None
            if beta > 0:
                with torch.no_grad(), reference():
                    _, ref_mean, _ = step_logprob(velocity, x, x_next, sigmas[i], sigmas[i + 1],
                                                  noise_level=noise_level, cap=cap, model_dtype=model_dtype)
            logprob, mean, std = step_logprob(velocity, x, x_next, sigmas[i], sigmas[i + 1],
                                              noise_level=noise_level, cap=cap, model_dtype=model_dtype)
            loss, step_stats = flow_grpo_loss(logprob, rollout.logprobs[i][part], adv[part], clip_range=clip_range,
                                              beta=beta, mean=mean, ref_mean=ref_mean, std=std)
            (loss * loss_scale * (x.shape[0] / rows)).backward()
            for name, values in step_stats.items():
                stats.setdefault(name, []).extend(values.float().cpu().tolist())
            stats.setdefault("logprob_diff", []).extend(
                (logprob.detach() - rollout.logprobs[i][part].to(logprob)).abs().cpu().tolist())
    return stats
