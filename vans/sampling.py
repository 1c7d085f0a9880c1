"""Flow-matching samplers over a velocity function: the Euler ODE and the Flow-GRPO SDE.

Conventions (rectified flow, as Wan and Flow-GRPO): x_σ = (1 − σ)·x₀ + σ·ε, σ = 1 is pure noise, the model predicts
v ≈ ε − x₀, and a step goes σ → σ' < σ. The schedule is DiffSynth's Wan schedule used by VANS:
s_i = linspace(1, 0, K + 1)[:K], σ_i = shift·s_i / (1 + (shift − 1)·s_i), timestep = 1000·σ_i,
and the last step goes to σ = 0.

The SDE step (Flow-GRPO) has mean
    μ = x + Δ·[v + s²/(2σ)·(x + (1 − σ)·v)],   Δ = σ' − σ < 0,
and standard deviation s·√(−Δ) with s = a·√(σ / (1 − σ)); its log-probability is a mean over the
elements of one sample (not a sum), computed in fp32. With a = 0 the step is the Euler step.

Branching (``sample_flow(branch_at=b, branch_size=G)``): the form of Flow-GRPO-Fast described in the flow_grpo
README ("Flow-GRPO-Fast") and implemented in its first version (``sd3_pipeline_with_logprob_s1.py``): one trajectory
per prompt runs steps 0 … b − 1, then its state is copied to G rows that continue independently (SDE inside the
window, ODE after). The prefix costs one row per step instead of G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .errors import InputError
from .progress import progress

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x [B, C, T, H, W], sigma scalar tensor) -> velocity with the shape of x."""

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def flow_sigmas(num_steps: int, shift: float = 5.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """K + 1 sigmas: the K step starts (1 … small) followed by the final 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:num_steps]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sigma_cap: float) -> torch.Tensor:
    """Step standard deviation s_σ·√h. At σ = 1 the pole is avoided with ``sigma_cap`` (the first σ < 1)."""
    safe = torch.where(sigma >= 1.0, torch.as_tensor(sigma_cap, dtype=sigma.dtype), sigma)
    s = noise_level * torch.sqrt(sigma / (1 - safe))
    return s * torch.sqrt(sigma - sigma_next)


def sde_step_mean(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  std: torch.Tensor) -> torch.Tensor:
    """Mean of the SDE transition, fp32. ``std`` is s_σ·√h, so s_σ² = std² / h."""
    x = x.float()
    v = v.float()
    h = sigma - sigma_next
    s2 = std * std / h
    delta = -h
    return x + delta * (v + s2 / (2 * sigma) * (x + (1 - sigma) * v))


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log-density of N(mean, std²·I), averaged over all non-batch elements (fp32)."""
    diff = sample.float() - mean
    lp = -(diff * diff) / (2 * std * std) - torch.log(std) - _HALF_LOG_2PI
    return lp.flatten(1).mean(dim=1)


def gaussian_step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps with the same covariance, per sample, averaged over elements."""
    diff = mean.float() - mean_ref.float()
    return (diff * diff / (2 * std * std)).flatten(1).mean(dim=1)


def sde_step_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    noise_level: float,
    sigma_cap: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One SDE transition. Returns (next sample, its log-prob [B] or None when noise_level = 0, mean, std).

    With ``prev_sample`` the transition is not sampled: the log-prob of that given next sample is
    computed (the training forward recomputes the rollout's log-probs this way).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    std = sde_std(sigma, sigma_next, noise_level, sigma_cap)
    if noise_level == 0:
        mean = x.float() + (sigma_next - sigma) * v.float()
        next_sample = mean if prev_sample is None else prev_sample.float()
        return next_sample, None, mean, std
    mean = sde_step_mean(x, v, sigma, sigma_next, std)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        next_sample = mean + std * noise
    else:
        next_sample = prev_sample.float()
    return next_sample, gaussian_logprob(next_sample, mean, std), mean, std


@dataclass
class SampleResult:
    latents: torch.Tensor
    sigmas: torch.Tensor
    # per kept step i: the state x_{σ_i} fed to the model and the sampled x_{σ_{i+1}} (fp32)
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    next_states: dict[int, torch.Tensor] = field(default_factory=dict)
    logprobs: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def sample_flow(
    velocity: VelocityFn,
    noise: torch.Tensor,
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    noise_level: float = 0.0,
    sde_steps: Iterable[int] | None = None,
    keep_steps: Iterable[int] = (),
    generator: torch.Generator | None = None,
    desc: str = "sampling",
    branch_at: int | None = None,
    branch_size: int = 1,
) -> SampleResult:
    """Integrate from pure noise to σ = 0.

    ``noise_level`` = 0 is the Euler ODE. With noise_level > 0 the SDE step is used on the steps in
    ``sde_steps`` (all steps when None) and the ODE elsewhere, as Flow-GRPO-Fast / MixGRPO do.
    States, next states and log-probs are stored only for ``keep_steps`` (memory: one latent each).
    The loop does no host synchronisation: nothing is read back to the CPU until the end.

    ``branch_at`` = b (None: no branching): the ``noise`` rows (one per prompt, usually 1) run steps 0 … b − 1
    alone; right before step b each row is repeated ``branch_size`` times (``repeat_interleave``: rows
    p·G … p·G + G − 1 branch from noise row p), and the loop goes on unchanged with B·G rows, so the states
    of step b are identical across each group and the rows differ only by the SDE draws from step b on.
    ``velocity`` sees batch B before the branch and B·G after (``VideoGenerator.guided_velocity`` expands a
    batch-1 caption and context). Kept steps must be ≥ b (the trained rows are the branched ones).
    Without ``branch_at`` the loop is exactly the unbranched one.
    """
    keep = set(keep_steps)
    if branch_at is not None:
        if not 0 <= branch_at < num_steps:
            raise InputError(f"branch_at={branch_at}: must be a step index in [0, {num_steps - 1}]")
        if branch_size < 1:
            raise InputError(f"branch_size={branch_size}: must be at least 1")
        early = sorted(i for i in keep if i < branch_at)
        if early:
            raise InputError(f"keep_steps {early} come before branch_at={branch_at}: only branched steps are kept")
    sigmas = flow_sigmas(num_steps, shift, device=noise.device)
    sigma_cap = float(flow_sigmas(num_steps, shift)[1]) if num_steps > 1 else 0.5
    sde_set = set(range(num_steps)) if sde_steps is None else set(sde_steps)
    result = SampleResult(latents=noise, sigmas=sigmas)
    x = noise.float()
    with progress(num_steps, desc) as bar:
        for i in range(num_steps):
            if i == branch_at:
                x = x.repeat_interleave(branch_size, dim=0)
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            v = velocity(x.to(noise.dtype), sigma)
            level = noise_level if i in sde_set else 0.0
            x_next, logprob, _, _ = sde_step_logprob(
                x, v, sigma, sigma_next, noise_level=level, sigma_cap=sigma_cap, generator=generator
            )
            if i in keep:
                result.states[i] = x
                result.next_states[i] = x_next
                if logprob is not None:
                    result.logprobs[i] = logprob
            x = x_next
            bar.update()
    result.latents = x
    return result
