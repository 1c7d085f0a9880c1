"""FLOP counts of the Wan2.1 DiT and of one stage-2 iteration per training mode: what the GPU figures of
``python -m vans.bench`` are judged against, and the projection of each stage-2 mode to the real sizes.
Counts only; nothing here runs a model."""

from __future__ import annotations


def dit_forward_flops(rows: int, tokens: int, text_len: int = 512, dim: int = 1536, ffn: int = 8960,
                      layers: int = 30, attention: bool = True) -> float:
    """FLOPs of one Wan2.1-1.3B forward over ``rows`` sequences of ``tokens`` tokens (patch embedding,
    embedders and head left out: < 0.1% at the real size). Per layer and token: self-attention q,k,v,o
    (4·d²), cross-attention q,o (2·d²), FFN (2·d·ffn) multiply-adds, and the cross-attention k,v of the
    ``text_len`` text tokens once per row; with ``attention``, also the scores and values, 2·L·d (self)
    and 2·text_len·d (cross) multiply-adds per token."""
    linear = 2 * tokens * (6 * dim * dim + 2 * dim * ffn) + 2 * text_len * 2 * dim * dim
    scores = 2 * 2 * tokens * (tokens + text_len) * dim if attention else 0
    return float(rows * layers * (linear + scores))


def scale_dit_flops(scale: str, rows: int, tokens: int) -> float:
    """``dit_forward_flops`` with the widths of the ``scale``'s DiT (prompts are 512 umT5 positions)."""
    from .fixtures.random_models import dit_config

    c = dit_config(scale)
    return dit_forward_flops(rows, tokens, 512, c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"],
                             c["num_layers"])


def dit_tokens(num_frames: int, height: int, width: int, num_context: int) -> int:
    """Tokens of [context ‖ target] latents: (context + target latent frames) × (h/2)·(w/2)."""
    latent_frames = (num_frames - 1) // 4 + 1
    return (num_context + latent_frames) * (height // 16) * (width // 16)


H100_CFG_STEP_S = 0.344
"""The engine's DiT step with CFG (2 rows, 13,200 tokens, bf16) on an H100, measured (README "Performance"):
2·dit_forward_flops(1, 13200) / 0.344 s ≈ 387 TFLOP/s, the rate the stage-2 projection assumes for every row."""


def stage2_rows(*, group_size: int = 8, steps: int = 20, rollout_cfg: bool = True, train_cfg: bool = True,
                trained_steps: float = 19, prefix_steps: float = 0.0, no_grad_forwards: int = 1,
                backward: float = 1.5, checkpointing: bool = True) -> dict[str, float]:
    """DiT rows (row-forward equivalents) of one stage-2 iteration of one group: a FLOP model, not a measurement.

    Rollout: ``prefix_steps`` steps on one shared row (the branched prefix), the other K − prefix on G rows, ×2 with
    CFG. Training, per trained step (or NFT noise level) and trained row (G, ×2 when the trained velocity is
    guided): forward 1 + ``backward`` (1.5 for LoRA: input gradients ≈ 1× of the linears, attention backward ≈ 2×
    its half share; 2 for full fine-tuning) + 1 recompute with gradient checkpointing + ``no_grad_forwards``
    (the KL reference when β > 0, DiffusionNFT's old policy, …). Fractional counts are means over a run."""
    rollout = (2 if rollout_cfg else 1) * (prefix_steps + (steps - prefix_steps) * group_size)
    per_row = 1 + backward + (1 if checkpointing else 0) + no_grad_forwards
    train = trained_steps * group_size * (2 if train_cfg else 1) * per_row
    return {"rollout": rollout, "train": train, "total": rollout + train}


def stage2_modes(group_size: int = 8, steps: int = 20, *, run_steps: int = 1000, beta: float = 0.004,
                 window: tuple[float, float] = (0.0, 0.5), window_size: int = 2, sliding_size: int = 4,
                 slide_every: int = 25, nft_timesteps: int = 4) -> dict[str, dict]:
    """``stage2_rows`` keyword arguments per stage-2 mode (defaults: stage2.yaml's sizes and settings).

    Branch points: the mean of ``window``'s uniform starts (``trainer.flow_grpo.window_starts``); ``sliding``: the
    mean start and window length over ``run_steps`` optimizer steps of the MixGRPO schedule (``plan_steps``)."""
    from trainer.flow_grpo import plan_steps, window_starts

    ref = 1 if beta > 0 else 0
    size, first, last = window_starts(steps, window, window_size)
    branch = (first + last) / 2
    slides = [plan_steps(steps, "sliding", window_size=sliding_size, step=n, slide_every=slide_every)
              for n in range(run_steps)]
    slide_start = sum(p.branch_at for p in slides) / run_steps
    slide_len = sum(len(p.train_steps) for p in slides) / run_steps
    all_steps = max(1, steps - 1)
    common = {"group_size": group_size, "steps": steps}
    return {
        "flow_grpo all, CFG (default)": dict(common, trained_steps=all_steps, no_grad_forwards=ref),
        "window unbranched, CFG": dict(common, trained_steps=size, no_grad_forwards=ref),
        "window (Fast, branched), CFG": dict(common, trained_steps=size, prefix_steps=branch, no_grad_forwards=ref),
        "window (Fast), guidance 1": dict(common, rollout_cfg=False, train_cfg=False, trained_steps=size,
                                          prefix_steps=branch, no_grad_forwards=ref),
        "sliding (MixGRPO), CFG": dict(common, trained_steps=slide_len, prefix_steps=slide_start,
                                       no_grad_forwards=ref),
        "sliding (MixGRPO), guidance 1": dict(common, rollout_cfg=False, train_cfg=False, trained_steps=slide_len,
                                              prefix_steps=slide_start, no_grad_forwards=ref),
        "nft, guidance 1, old policy": dict(common, rollout_cfg=False, train_cfg=False, trained_steps=nft_timesteps,
                                            no_grad_forwards=1),
        "nft, guidance 1, on-policy": dict(common, rollout_cfg=False, train_cfg=False, trained_steps=nft_timesteps,
                                           no_grad_forwards=0),
        "nft, CFG rollout, conditional training": dict(common, train_cfg=False, trained_steps=nft_timesteps,
                                                       no_grad_forwards=1),
    }


def stage2_projection(modes: dict[str, dict] | None = None, tokens: int = 13_200,
                      step_s: float = H100_CFG_STEP_S) -> list[dict]:
    """Per mode: DiT rows, PFLOP and projected H100 seconds of one iteration at ``tokens`` tokens per row (the
    real size: 13,200), and the ratio to the first mode. A projection: FLOP count × the rate of ``step_s``."""
    modes = stage2_modes() if modes is None else modes
    row_flops = dit_forward_flops(1, tokens)
    rate = dit_forward_flops(2, 13_200) / step_s
    table = []
    for name, kwargs in modes.items():
        rows = stage2_rows(**kwargs)
        table.append({"mode": name, **rows, "pflop": rows["total"] * row_flops / 1e15,
                      "projected_s": rows["total"] * row_flops / rate})
    for entry in table:
        entry["speedup"] = table[0]["projected_s"] / entry["projected_s"]
    return table
