"""Token-level GRPO loss of stage 1 (VANS paper Eq. 2; the released compute_grpo_loss).

Per token t of completion i, with λ = log π_ref − log π_θ and ρ = exp(log π_θ − log π_old):

    ℓ_{i,t} = min(ρ·Â_i, clip(ρ, 1 − ε, 1 + ε)·Â_i) − β·(exp(λ) − λ − 1)       (k3 KL estimator)
    loss    = −mean_i [ (1/|o_i|) Σ_t ℓ_{i,t} ]                                 (per-sequence mean, VANS)

``loss_type="token"`` instead divides the sum over all tokens by the number of action tokens (no
length bias). Advantages come from ``vans.rewards`` (``group_advantages``); a group whose advantages
are all zero and whose policy equals the reference gives exactly zero gradient. With one update per
rollout ``old_logp`` is the detached ``logp`` and ρ ≡ 1 (one update per rollout, as the released VANS code): the clip then never fires, and
the gradient is Â·∇log π_θ plus the KL term.
"""

from __future__ import annotations

import torch

from vans.errors import InputError


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(λ) − λ − 1 with λ = ref − logp: ≥ 0, unbiased for KL(π_θ‖π_ref) under samples of π_θ."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.004,
                    loss_type: str = "sequence") -> tuple[torch.Tensor, dict[str, float]]:
    """(scalar loss, stats). ``logp``/``old_logp``/``ref_logp``/``mask``: [G, L]; ``advantages``: [G].

    ``ref_logp`` may be None when ``beta`` is 0. Stats: ``ratio_mean``, ``ratio_min``, ``ratio_max``,
    ``clip_frac`` (fraction of action tokens where the clipped term was taken), ``kl`` (mean k3 over
    action tokens), ``pg_loss``, ``kl_loss``.
    """
    if loss_type not in ("sequence", "token"):
        raise InputError(f"loss_type '{loss_type}' is not known; use sequence (VANS) or token")
    if beta and ref_logp is None:
        raise InputError("the KL term needs the reference log-probabilities; pass ref_logp or set beta=0")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.device, logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    policy_term = torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp.detach()) if ref_logp is not None else torch.zeros_like(logp)
    per_token = -(policy_term - beta * kl)

    tokens = mask.sum(dim=1).clamp(min=1.0)
    if loss_type == "sequence":
        def reduce(x):
            return ((x * mask).sum(dim=1) / tokens).mean()
    else:
        def reduce(x):
            return (x * mask).sum() / mask.sum().clamp(min=1.0)
    loss = reduce(per_token)

    with torch.no_grad():
        active = mask.bool()
        r = ratio[active]
        n = max(1, int(active.sum()))
        stats = {
            "ratio_mean": float(r.mean()) if r.numel() else 1.0,
            "ratio_min": float(r.min()) if r.numel() else 1.0,
            "ratio_max": float(r.max()) if r.numel() else 1.0,
            "clip_frac": float(((clipped < unclipped) & active).sum()) / n,
            "kl": float((kl * mask).sum()) / n,
            "pg_loss": float(reduce(-policy_term)),
            "kl_loss": float(reduce(beta * kl)),
        }
    return loss, stats
