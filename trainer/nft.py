"""DiffusionNFT for stage 2: a likelihood-free policy objective on the rollouts' clean latents.

Source: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117);
official code NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (loss, old-policy schedule ``return_decay``);
Flow-Factory ``trainers/nft.py`` and ``examples/nft/lora/wan21/t2v.yaml`` (the Wan2.1-T2V-1.3B recipe: β 0.1,
4 discrete timesteps in the first 0.9 of the schedule, old policy = EMA with decay min(0.001·step, 0.5), no KL,
adv clip 5). Written here from the paper's math; both use this module's convention x_σ = (1 − σ)·x₀ + σ·ε,
v* = ε − x₀.

Procedure per group: rollouts with any sampler (the ODE, ``noise_level`` 0: no log-probs, no stored states),
rewards → group advantages A (``trainer.flow_grpo.advantages``, clipped to ±A_max = ``adv_clip``), then for each of
T training noise levels σ (``nft_timesteps``): fresh ε per row, x_σ = (1 − σ)·x₀ + σ·ε, the policy's velocity
v_θ (with gradient) and the old policy's v_old (none), and the loss (``nft_loss``):

    r  = clamp(A / A_max / 2 + 1/2, 0, 1)                  "optimality" weight, A = 0 → 1/2   (``nft_weight``)
    v⁺ = β·v_θ + (1 − β)·v_old,   v⁻ = (1 + β)·v_old − β·v_θ     implicit positive / negative policies
    x̂⁺ = x_σ − σ·v⁺,   x̂⁻ = x_σ − σ·v⁻                         their x₀ predictions
    w± = max(⟨|x̂± − x₀|⟩, 1e-5)  (no gradient, fp64)            adaptive per-sample normalisers
    ℓ  = [r·⟨(x̂⁺ − x₀)²⟩ / w⁺ + (1 − r)·⟨(x̂⁻ − x₀)²⟩ / w⁻] / β,    L = A_max · mean over rows of ℓ

(⟨·⟩ = mean over one row's elements). At v_θ = v_old the gradient of one row's A_max·ℓ is −2σ·A·(x̂ − x₀)/(D·w)
(D elements): flow matching toward the sample for A > 0, away for A < 0, and exactly 0 for A = 0. Away from v_old,
r = 1/2 pulls v_θ back toward v_old (a trust region). With no old policy (``old=None``) v_old is the current prediction detached
(exact when the old policy's decay is 0 and there is one optimizer step per rollout batch; saves one forward).

When to use it: the cheapest objective per iteration (no SDE, no log-probs, any solver and step count for the
rollouts, no reference model); the paper reports up to 25× the efficiency of Flow-GRPO. Its official recipe is
CFG-free (guidance 1 in rollouts and training); VANS's DiT is evaluated at CFG 5, so guided rollouts with a
conditional-only trained velocity are the practical alternative (off-policy data, which the supervised objective
tolerates; Flow-Factory trains DGPO that way).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from vans.errors import InputError
from vans.sampling import VelocityFn, flow_sigmas

WEIGHT_FLOOR = 1e-5
"""Floor of the adaptive normaliser w± (DiffusionNFT ``train_nft_sd3.py``; Flow-Factory ``nft.py``)."""


def nft_weight(adv: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = clamp(clamp(A, ±A_max) / A_max / 2 + 1/2, 0, 1) ∈ [0, 1]: 1 for the best, 0 for the worst, 1/2 for A = 0."""
    if adv_clip <= 0:
        raise InputError(f"adv_clip={adv_clip}: DiffusionNFT needs adv_clip > 0 (it scales the reward weight)")
    a = torch.as_tensor(adv).clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2 + 0.5).clamp(0.0, 1.0)


def nft_timesteps(num_steps: int, shift: float, count: int, frac_range: tuple[float, float] = (0.0, 0.9), *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` training noise levels σ [T] (float32), taken from the rollout's own K-step schedule.

    The candidates are the schedule's step starts σ_i (``flow_sigmas``) with σ_i in [1 − hi, 1 − lo] for
    ``frac_range`` = (lo, hi) (fractions of the trajectory from pure noise, as Flow-Factory's ``timestep_range``:
    0.9 means (0, 0.9), t = 1000·σ in [100, 1000]); they are split into ``count`` equal consecutive strata and one
    index is drawn uniformly from each (stratified, Flow-Factory's ``discrete`` strategy), so every draw covers the
    whole range. ``count`` ≥ the number of candidates takes them all (the official code trains all
    int(K·0.99) schedule values). The draw is shared by the group. Ordered from high noise to low.
    """
    lo, hi = frac_range
    if not 0 <= lo < hi <= 1:
        raise InputError(f"nft_timestep_range={[lo, hi]}: need 0 <= start < end <= 1 (0 = pure noise)")
    if count < 1:
        raise InputError(f"nft_timesteps={count}: must be at least 1")
    sigmas = flow_sigmas(num_steps, shift)[:-1]
    valid = torch.nonzero((sigmas >= 1 - hi - 1e-6) & (sigmas <= 1 - lo + 1e-6)).flatten()
    if valid.numel() == 0:
        raise InputError(f"nft_timestep_range={[lo, hi]} holds no step of the {num_steps}-step schedule; widen it")
    n = valid.numel()
    if count >= n:
        return sigmas[valid].clone()
    bounds = torch.tensor([k * n // count for k in range(count + 1)])  # strictly increasing as count < n
    widths = bounds[1:] - bounds[:-1]
    picks = bounds[:-1] + (torch.rand(count, generator=generator, dtype=torch.float64) * widths).long()
    return sigmas[valid[picks]].clone()


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor | float,
             r: torch.Tensor, *, beta: float, adv_clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT loss L of one noise level over B rows (module docstring); returns (L, per-row stats).

    ``v`` carries the gradient; ``v_old``, ``x0``, ``x_t`` and ``r`` (``nft_weight``, [B]) are data. Stats (detached,
    [B]): ``loss`` (A_max·ℓ per row), ``old_deviate`` ⟨(v − v_old)²⟩, ``r``."""
    if beta <= 0:
        raise InputError(f"nft_beta={beta}: must be > 0 (Flow-Factory Wan 0.1, paper 1.0)")
    v = v.float()
    v_old = v_old.detach().float()
    x0 = x0.detach().float()
    x_t = x_t.detach().float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=v.device)
    # v⁺ = β·v + (1 − β)·v_old and v⁻ = (1 + β)·v_old − β·v written around v_old, so that at v = v_old both are
    # v_old bit for bit and the two halves of the gradient cancel exactly for r = 1/2
    step = beta * (v - v_old)
    v_pos = v_old + step
    v_neg = v_old - step
    err_pos = (x_t - sigma * v_pos - x0).flatten(1)
    err_neg = (x_t - sigma * v_neg - x0).flatten(1)
    with torch.no_grad():
        w_pos = err_pos.double().abs().mean(dim=1).clamp_min(WEIGHT_FLOOR)
        w_neg = err_neg.double().abs().mean(dim=1).clamp_min(WEIGHT_FLOOR)
    r = torch.as_tensor(r, dtype=torch.float32, device=v.device).reshape(-1)
    term_pos = (err_pos * err_pos).mean(dim=1) / w_pos.to(err_pos.dtype)
    term_neg = (err_neg * err_neg).mean(dim=1) / w_neg.to(err_neg.dtype)
    per_row = adv_clip * (r * term_pos + (1 - r) * term_neg) / beta
    stats = {"loss": per_row.detach(), "old_deviate": ((v - v_old) ** 2).flatten(1).mean(dim=1).detach(),
             "r": r.detach()}
    return per_row.mean(), stats


def train_nft(velocity: VelocityFn, x0: torch.Tensor, adv: torch.Tensor, sigmas: torch.Tensor, *, beta: float,
              adv_clip: float, model_dtype: torch.dtype, generator: torch.Generator | None = None,
              old: Callable[[], ContextManager] | None = None, kl: float = 0.0,
              reference: Callable[[], ContextManager] | None = None, loss_scale: float = 1.0,
              micro_batch: int = 0) -> dict[str, list[float]]:
    """Backward the DiffusionNFT loss of one group (G clean latents ``x0``, fp32) at each σ of ``sigmas``.

    One fresh ε [G, …] per σ from ``generator`` (drawn on the generator's device, whole group at once, so
    ``micro_batch`` does not change the draws); ``velocity`` (the trained model call, e.g. the conditional
    ``VideoGenerator.guided_velocity``) gets x_σ in ``model_dtype``. ``old``: a zero-argument callable returning a
    context manager inside which ``velocity`` is the old policy (no gradient; None = the current prediction
    detached), e.g. ``lambda: old_policy(dit, old_tensors)``; it and ``reference`` run before the graded forward,
    so they may swap weights in place. ``kl`` > 0 adds kl·⟨(v_θ − v_ref)²⟩ with v_ref under ``reference()``
    (DiffusionNFT's optional v-space KL; Flow-Factory Wan: off). Each σ (and micro-batch) is backwarded on its own, so one graph lives at a
    time; ``loss_scale`` turns the sum over noise levels and groups into a mean. Returns per-row stat lists.
    """
    if kl > 0 and reference is None:
        raise InputError("nft_kl > 0 needs the reference policy; pass reference")
    rows = x0.shape[0]
    if adv.shape[0] != rows:
        raise InputError(f"{adv.shape[0]} advantages for {rows} latents")
    chunk = rows if micro_batch <= 0 else min(micro_batch, rows)
    r_all = nft_weight(adv, adv_clip).to(x0.device)
    gen_device = generator.device if generator is not None else x0.device
    stats: dict[str, list[float]] = {}
    for sigma in sigmas:
        sigma = sigma.to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x0.device)
        x_t_all = (1 - sigma) * x0.float() + sigma * eps
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            x_t = x_t_all[part]
            v_old = v_ref = None
            if kl > 0:
                with torch.no_grad(), reference():
                    v_ref = velocity(x_t.to(model_dtype), sigma).float()
            if old is not None:  # before the graph of v: ``old`` may swap the trained tensors in place
                with torch.no_grad(), old():
                    v_old = velocity(x_t.to(model_dtype), sigma)
            v = velocity(x_t.to(model_dtype), sigma)
            if v_old is None:
                v_old = v.detach()
            loss, row_stats = nft_loss(v, v_old, x0[part], x_t, sigma, r_all[part], beta=beta, adv_clip=adv_clip)
            if kl > 0:
                kl_rows = ((v.float() - v_ref) ** 2).flatten(1).mean(dim=1)
                loss = loss + kl * kl_rows.mean()
                row_stats["kl"] = kl_rows.detach()
            (loss * loss_scale * (x_t.shape[0] / rows)).backward()
            for name, values in row_stats.items():
                stats.setdefault(name, []).extend(values.float().cpu().tolist())
    return stats


# -- the old policy: an EMA of the trained tensors -------------------------------------------------------------

def old_decay(step: int, *, flat: int = 0, ramp: float = 0.001, max_decay: float = 0.5) -> float:
    """EMA decay d of the old policy after ``step`` optimizer steps: 0 before ``flat``, then min((step − flat)·ramp,
    max_decay). DiffusionNFT ``return_decay`` type 1 is (0, 0.001, 0.5) (its default; Flow-Factory Wan's
    ``piecewise_linear`` the same); type 2 (OCR) is (75, 0.0075, 0.999); ramp 0 is d = 0: old = current."""
    if step < flat:
        return 0.0
    return float(min((step - flat) * ramp, max_decay))


def trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s trainable tensors by name (the old policy's initial value)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def update_old_(old: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """old ← d·old + (1 − d)·current, in place (DiffusionNFT: once per epoch, before sampling; d = ``old_decay``)."""
    params = dict(model.named_parameters())
    for name, tensor in old.items():
        tensor.mul_(decay).add_(params[name].detach().to(tensor.dtype), alpha=1 - decay)


@contextlib.contextmanager
def old_policy(model: nn.Module, old: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block ``model``'s trainable tensors hold ``old`` (no gradient flows); restored on exit."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in old}
    try:
        with torch.no_grad():
            for name, tensor in old.items():
                params[name].copy_(tensor)
        yield
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
