"""Stage 2 of Joint-GRPO: Flow-GRPO (or a fast variant) on the Wan2.1 DiT with the stage-1 VLM frozen (VANS §6.3).

    python -m trainer.stage2 --config trainer/configs/stage2.yaml [--set key=value ...] [--resume]
    accelerate launch -m trainer.stage2 --config ...            (data parallel, one process per GPU)

One optimizer step, per prompt (a dataset sample) of the local batch:

1. **anchor caption**: the frozen VLM (``Captioner.caption``) describes the next event; it is drawn again
   until its ROUGE-L against the ground-truth caption reaches ``anchor.min_rouge`` (0.6), at most
   ``anchor.max_tries`` times, else the sample is skipped (``anchor_skipped``; ``anchor.on_miss=gt`` uses the
   ground-truth caption instead, counted as ``anchor_fallbacks``);
2. **context**: the input clip's clean context latents, VAE-encoded once per sample and cached
   (memory + ``FeatureCache`` on disk), as are the GT video's CLIP features;
3. **rollouts**: G = ``grpo.group_size`` trajectories (``VideoGenerator.sample``): for ``grpo.algorithm``
   ``flow_grpo`` SDE steps (noise_level > 0) on the ``grpo.step_selection`` plan — ``all`` (the paper's) /
   ``fraction`` from G noises (or one with ``same_noise``), ``window`` (Flow-GRPO-Fast) / ``sliding`` (MixGRPO)
   branched from one ODE prefix per group — with states and log-probs kept for the trained steps only; for
   ``nft`` (DiffusionNFT) G ODE trajectories, by the old policy when ``nft_off_policy``;
4. **reward**: r2 = norm(CLIP-V(video, GT video)) + norm(CLIP-T(video, anchor)) (``vans.rewards.stage2_reward``);
   advantages per group; a group without reward spread is skipped (no gradient) and counted;
5. **loss**: ``trainer.flow_grpo.train_on_rollout`` recomputes each trained step with gradient through
   ``VideoGenerator.guided_velocity`` (the one model call) and backpropagates the clipped loss + β·KL; nft:
   ``trainer.nft.train_nft`` backpropagates the advantage-weighted flow-matching loss at ``nft_timesteps``
   noise levels (the rollout's guided velocity, or the conditional one with ``train_guidance: none``).

The settings and what each mode is for: ``trainer.stage2_config`` (re-exported here).
The runner (``trainer.runner``) owns the optimizer, schedule, clipping, checkpoints, resume, data
sharding and metrics; ``export`` writes a ComfyUI LoRA and a merged DiT (``trainer.dit_lora``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from vans.errors import InputError

from . import dit_lora, flow_grpo, nft
from .data import vae_tiling_key
from .stage2_config import (AnchorSection, ExportSection, GrpoSection, ModelSection, RewardSection,  # noqa: F401
                            Stage2Config, Stage2RunConfig, VideoSection)

log = logging.getLogger("vans.trainer")


# ----------------------------------------------------------------------------------------------------
# The policy


@dataclass
class _Prompt:
    """What one sample needs for its G rollouts, all computed once per visit (most of it cached)."""

    sample: object
    anchor: str | None  # None: every VLM draw missed min_rouge and on_miss=skip
    anchor_tries: int
    anchor_fallback: bool
    context: torch.Tensor  # [1, C, n, h, w] clean context latents on the device
    cond: torch.Tensor  # [1, L, D] anchor embedding
    gt_features: torch.Tensor | None  # [T, D] CLIP features of the GT video


class _Timer:
    """Seconds per phase of one step (``<phase>_s`` in the metrics)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[f"{phase}_s"] = self.seconds.get(f"{phase}_s", 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _on(module, device: torch.device) -> Iterator[None]:
    """Keep a big frozen model (umT5-XXL) on the CPU except while it runs."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class Stage2Policy:
    """The trainer's ``TrainingPolicy`` for stage 2 (see the module docstring for one step)."""

    name = "stage 2"
    memory_settings = ("grpo.micro_batch", "grpo.group_size", "model.gradient_checkpointing",
                       "grpo.step_selection", "video.num_frames")

    def __init__(self, cfg: Stage2Config, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cache=None, rank: int = 0, context_cache_size: int = 8):
        from vans.models import require, resolve_models
        from vans.wan import load_dit, load_text_encoder, load_vae
        from vans.generator import VideoGenerator
        from vans.wan.dit import check_text_encoder_matches

        from vans.cache import LRUCache

        from .data import FeatureCache

        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.rank = rank
        self.cache = cache if cache is not None else FeatureCache(None)
        explicit = {k: getattr(cfg, k) or None for k in ("dit", "vlm", "vlm_checkpoint", "clip")}
        self.paths = resolve_models(cfg.models_dir or None, **explicit)
        needed = ("dit", "text_encoder", "vae") + (("clip",) if cfg.reward.kind == "clip" else ()) \
            + (("vlm",) if cfg.anchor.source == "vlm" else ())
        require(self.paths, needed, cfg.models_dir or None)

        dit = load_dit(self.paths.dit, dtype=dtype, device=self.device)
        text_encoder = load_text_encoder(self.paths.text_encoder, tokenizer=self.paths.tokenizer, dtype=dtype,
                                         device="cpu")
        check_text_encoder_matches(dit, text_encoder)
        vae = load_vae(self.paths.vae, dtype=dtype, device=self.device)
        self.generator = VideoGenerator(dit, text_encoder, vae, device=self.device, dtype=dtype, offload=False)
        m = cfg.model
        with torch.random.fork_rng(devices=[]):  # the same adapter init in every process and every run
            torch.manual_seed(cfg.run.seed)
            self._params = dit_lora.prepare_dit(dit, m.train_mode, targets=m.lora_targets, rank=m.lora_rank,
                                                alpha=m.lora_alpha)
        if m.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        g = cfg.grpo
        needs_reference = g.nft_kl > 0 if g.algorithm == "nft" else g.beta > 0
        self.frozen = dit_lora.frozen_copy(dit) if m.train_mode == "full" and needs_reference else None
        # DiffusionNFT's old policy: an EMA of the trained tensors, checkpointed with them (OLD_PREFIX)
        self._old = nft.trainable_copy(dit) if g.old_policy_moves() else None
        self.settings = cfg.generation_settings()
        self.cap = flow_grpo.sigma_cap(self.settings.steps, self.settings.shift)
        self._captioner = None
        self._clip = None
        self._anchors: dict[str, tuple[str, int, bool]] = {}
        self._contexts = LRUCache(context_cache_size)  # device copies of the most recent context latents

    # -- TrainingPolicy protocol -------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, plus nft's old policy under ``OLD_PREFIX`` (so a resumed run continues its EMA
        exactly; ``export`` writes the trained DiT only)."""
        sd = dit_lora.trainable_state_dict(self.generator.dit)
        if self._old is not None:
            sd.update({OLD_PREFIX + name: t.detach() for name, t in self._old.items()})
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        old = {k[len(OLD_PREFIX):]: v for k, v in sd.items() if k.startswith(OLD_PREFIX)}
        dit_lora.load_trainable_state_dict(self.generator.dit, {k: v for k, v in sd.items()
                                                                if not k.startswith(OLD_PREFIX)})
        if self._old is None:
            return
        if set(old) != set(self._old):
            raise InputError("checkpoint has no DiffusionNFT old policy for these weights (nft_old.* keys): resume "
                             "with the algorithm and grpo.nft_old_* settings it was saved with")
        with torch.no_grad():
            for name, tensor in old.items():
                self._old[name].copy_(tensor.to(self._old[name].dtype))

    def export(self, out_dir) -> dict[str, Path]:
        """ComfyUI LoRA (train_mode=lora) + merged DiT in the original Wan layout under ``out_dir``."""
        out = Path(out_dir)
        e = self.cfg.export
        meta = {"vans_stage": "2", "steps": str(self.cfg.run.steps)}
        files = {}
        if self.cfg.model.train_mode == "lora":
            files["lora"] = dit_lora.export_comfy_lora(self.generator.dit, out / e.lora_name, dtype=e.dtype,
                                                       metadata=meta)
        files["dit"] = dit_lora.export_merged_dit(self.generator.dit, out / e.merged_name, dtype=e.dtype, metadata=meta)
        return files

    def extra_state(self) -> dict[str, list]:
        """The anchors kept for later visits (``anchor.reuse``), by sample id: ``[caption or None, VLM draws of
        the first visit, GT used]``. The runner saves them in every checkpoint, so a resumed run reuses them
        as an uninterrupted run does: it draws no anchor again, and ``count/anchor_vlm_calls`` (the VLM draws
        made at a step) matches the uninterrupted run's."""
        return {sample_id: list(kept) for sample_id, kept in self._anchors.items()}

    def load_extra_state(self, state: dict) -> None:
        self._anchors = {str(sample_id): (kept[0], int(kept[1]), bool(kept[2])) for sample_id, kept in state.items()}

    def step(self, samples: list, step: int) -> dict[str, float]:
        """Rollouts, rewards and the backward pass of one optimizer step over the local ``samples``."""
        timer = _Timer(self.device)
        cfg, G = self.cfg, self.cfg.grpo.group_size
        totals: dict[str, list[float]] = {}
        counts = {"groups": 0, "zero_spread_groups": 0, "skipped_groups": 0, "anchor_fallbacks": 0,
                  "anchor_skipped": 0, "anchor_vlm_calls": 0, "trained_steps": 0, "samples": 0,
                  "dit_calls": 0, "dit_rollout_rows": 0, "dit_train_rows": 0}  # DiT forwards (the FLOP model's rows)
        gen, calls = self.generator, self.generator.dit_calls
        g = cfg.grpo
        if self._old is not None:  # before sampling: old ← d·old + (1 − d)·current (DiffusionNFT, once per step)
            decay = nft.old_decay(step - 1, flat=g.nft_old_flat, ramp=g.nft_old_ramp, max_decay=g.nft_old_decay_max)
            nft.update_old_(self._old, self.generator.dit, decay)
            totals["nft_old_decay"] = [decay]
        for index, sample in enumerate(samples):
            seed = _seed(cfg.run.seed, step, self.rank, index)
            counts["samples"] += 1
            with timer("prepare"):
                prompt = self._prepare(sample, seed, timer)
            counts["anchor_vlm_calls"] += prompt.anchor_tries
            if prompt.anchor is None:
                counts["anchor_skipped"] += 1
                continue
            counts["anchor_fallbacks"] += int(prompt.anchor_fallback)
            # flow_grpo: the group's SDE / trained steps (sliding: a function of the optimizer steps done)
            plan = None if g.algorithm == "nft" else cfg.plan(step - 1, torch.Generator().manual_seed(seed))
            rows = gen.dit_rows
            with timer("rollout"):
                rollout, velocity = self._rollout(prompt, plan, seed)
            counts["dit_rollout_rows"] += gen.dit_rows - rows
            with timer("decode"):
                videos = self._decode(rollout.latents)
            with timer("reward"):
                terms = self._reward(videos, prompt)
            reward = terms["reward"]
            counts["groups"] += 1
            raw = {name: values for name, values in terms.items()
                   if name not in ("reward", "skipped") and not name.endswith("_norm")}
            for name, values in raw.items():
                totals.setdefault(f"reward_{name}", []).extend(values.tolist())
            # the raw sum of the terms; the group-normalised ``reward`` (mean ≈ 0) only feeds the advantages
            total = sum(raw.values()) if raw else reward
            totals.setdefault("reward_total", []).extend(total.tolist())
            totals.setdefault("frame_change", []).extend(_frame_change(videos).tolist())
            if terms["skipped"]:
                counts["skipped_groups"] += 1
                continue
            adv = flow_grpo.advantages(reward, G, cfg.grpo.adv_clip)
            totals.setdefault("advantage", []).extend(adv.tolist())
            if bool(flow_grpo.zero_spread_groups(reward, G)[0]):
                counts["zero_spread_groups"] += 1
                continue
            reference = lambda: dit_lora.reference_policy(self.generator, cfg.model.train_mode,  # noqa: E731
                                                          self.frozen)
            rows = gen.dit_rows
            with timer("train"):
                if plan is None:
                    stats, trained = self._train_nft(velocity, rollout.latents, adv, seed, reference, len(samples))
                else:
                    trained = len(plan.train_steps)
                    stats = flow_grpo.train_on_rollout(
                        velocity, rollout, plan.train_steps, adv.to(self.device), noise_level=g.noise_level,
                        cap=self.cap, model_dtype=self.dtype, clip_range=g.clip_range, beta=g.beta,
                        reference=reference, loss_scale=1.0 / (trained * len(samples)), micro_batch=g.micro_batch)
            counts["trained_steps"] += trained
            counts["dit_train_rows"] += gen.dit_rows - rows
            for name, values in stats.items():
                totals.setdefault(name, []).extend(values)
        counts["dit_calls"] = gen.dit_calls - calls
        return _summarise(totals, counts, timer.seconds)

    # -- per-sample preparation ----------------------------------------------------------------------

    def _prepare(self, sample, seed: int, timer: _Timer) -> _Prompt:
        anchor, tries, fallback = self._anchor(sample, seed)
        if anchor is None:
            return _Prompt(sample, None, tries, False, None, None, None)
        context = self._context(sample)
        texts = [anchor] + ([self.settings.negative_prompt] if self.settings.guidance != 1.0 else [])
        missing = any(self.generator.cached_text(t) is None for t in texts)
        with _on(self.generator.text_encoder, self.device) if missing else contextlib.nullcontext():
            cond = self.generator.encode_text([anchor])
            if len(texts) > 1:
                self.generator.encode_text([self.settings.negative_prompt])  # cached for the rollouts
        gt = self._gt_features(sample) if self.cfg.reward.kind == "clip" else None
        return _Prompt(sample, anchor, tries, fallback, context, cond, gt)

    def _anchor(self, sample, seed: int) -> tuple[str | None, int, bool]:
        """(caption or None for a miss, VLM draws this visit, GT used instead). See ``AnchorSection``.

        The VANS rule (paper Sec. 4.3): draw an anchor caption from the frozen stage-1 VLM and keep it only
        when its ROUGE-L against the GT caption is at least ``min_rouge``; otherwise discard and draw again,
        here at most ``max_tries`` times. A sample without an accepted anchor is skipped (``on_miss=skip``);
        the GT caption replaces it only when asked (``on_miss=gt``)."""
        a = self.cfg.anchor
        if a.source == "gt":
            return sample.caption, 0, False
        if a.reuse and sample.id in self._anchors:
            caption, _, fallback = self._anchors[sample.id]
            return caption, 0, fallback
        from vans.prompts import system_prompt_text
        from vans.rewards import rouge_l
        from vans.video import read_video

        if a.reuse:  # drawn once per sample: seeded by the sample, so a resumed run draws the same anchor
            seed = zlib.crc32(f"{self.cfg.run.seed}:{sample.id}".encode())
        captioner = self._load_captioner()
        frames = read_video(sample.video, num_frames=a.num_frames, min_frames=a.num_frames, what="input video").frames
        tries = 1 if captioner.is_deterministic(a.decoding, a.temperature) else a.max_tries
        miss = (sample.caption, True) if a.on_miss == "gt" else (None, False)
        result = (*miss[:1], tries, miss[1])
        for attempt in range(tries):
            text = captioner.caption(frames, sample.question, temperature=a.temperature, top_p=a.top_p,
                                     max_new_tokens=a.max_new_tokens, seed=seed + attempt, num_frames=a.num_frames,
                                     system_prompt=system_prompt_text(a.system_prompt), decoding=a.decoding).caption
            if text.strip() and rouge_l(text, sample.caption) >= a.min_rouge:
                result = (text, attempt + 1, False)
                break
        captioner.offload()
        if a.reuse:
            self._anchors[sample.id] = result
        return result

    def _load_captioner(self):
        if self._captioner is None:
            from vans.captioner import load_captioner

            self._captioner = load_captioner(self.paths.vlm, checkpoint=self.paths.vlm_checkpoint, dtype=self.dtype,
                                             device="cpu")
            self._captioner.device = self.device
        return self._captioner

    def _context(self, sample) -> torch.Tensor:
        from vans.video import read_clip

        s, pick = self.settings, self._frame_pick()
        key = (sample.id, sample.video)
        cached = self._contexts.get(key)
        if cached is None:
            def encode() -> torch.Tensor:
                clip = read_clip(sample.video, s.num_frames, s.height, s.width, pick, what="input video")
                return self.generator.encode_context(clip.frames, s.num_context).float().cpu()

            latents = self.cache.get_or_compute("stage2_context", [Path(sample.video), Path(self.paths.vae),
                                                                   s.num_frames, s.height, s.width, s.num_context,
                                                                   pick.mode, pick.fps, str(self.dtype),
                                                                   vae_tiling_key(self.generator.vae)],
                                                encode)
            cached = self._contexts.put(key, latents.to(self.device, self.dtype))
        return cached

    def _frame_pick(self):  # the VDM's view of the input and GT clips (vans.video.FramePick)
        from .data import frame_pick

        return frame_pick(self.cfg.video, "video")

    def _gt_features(self, sample) -> torch.Tensor:
        from vans.video import read_clip

        s, pick = self.settings, self._frame_pick()
        scorer = self._scorer()

        def encode() -> torch.Tensor:  # the GT clip seen as the rollouts are: same frames, same crop (as vans eval)
            clip = read_clip(sample.gt_video, s.num_frames, s.height, s.width, pick, what="ground-truth video")
            return scorer.image_features(clip.frames, self.cfg.reward.clip_batch).float().cpu()

        return self.cache.get_or_compute("stage2_clip_gt", [Path(sample.gt_video), Path(self.paths.clip),
                                                            scorer.arch, s.num_frames, s.height, s.width,
                                                            pick.mode, pick.fps],
                                         encode)

    def _scorer(self):
        if self._clip is None:
            from vans.clip import load_clip

            self._clip = load_clip(self.paths.clip, arch=self.cfg.reward.clip_arch, device=self.device)
        return self._clip

    # -- rollout, decode, reward -------------------------------------------------------------------

    def _rollout(self, prompt: _Prompt, plan: flow_grpo.StepPlan | None, seed: int):
        """G trajectories of one prompt; the returned velocity is the one used (with grad) to train.

        flow_grpo (``plan``): SDE on ``plan.sde_steps``; with ``plan.branch_at`` (window, sliding) one initial noise
        and one ODE row up to the branch step, G rows after it (``sample_flow(branch_at=…)``), else G rows from
        G noises (one shared noise with ``same_noise``). nft (``plan`` None): G ODE trajectories, nothing stored,
        sampled by the old policy when ``nft_off_policy``."""
        g, gen, G = self.cfg.grpo, self.generator, self.cfg.grpo.group_size
        branch = plan is not None and plan.branch_at is not None
        noise = gen.initial_noise(1 if branch or g.same_noise else G, self.settings, seed=seed)
        if not branch:
            noise = noise.expand(G, *noise.shape[1:]).contiguous()
        uncond = gen.encode_text([self.settings.negative_prompt]) if self.settings.guidance != 1.0 else None
        # the training forward uses the rollout's exact model call (same timestep numerics)
        velocity = gen.guided_velocity(prompt.context, prompt.cond, uncond, self.settings.guidance,
                                       timestep_dtype=self.settings.timestep_dtype)
        sde_generator = torch.Generator(self.device).manual_seed(seed + 1)
        kwargs = {} if plan is None else {"sde_steps": plan.sde_steps, "keep_steps": plan.train_steps}
        if branch:
            kwargs.update(branch_at=plan.branch_at, branch_size=G)
        sampler = contextlib.nullcontext()
        if plan is None and self._old is not None and g.nft_off_policy:
            sampler = nft.old_policy(gen.dit, self._old)
        with torch.no_grad(), sampler:
            rollout = gen.sample(prompt.context, prompt.cond, self.settings, noise=noise, generator=sde_generator,
                                 **kwargs)
        if g.train_guidance == "none" and uncond is not None:  # nft only (validated): the conditional velocity
            velocity = gen.guided_velocity(prompt.context, prompt.cond, None, 1.0,
                                           timestep_dtype=self.settings.timestep_dtype)
        return rollout, velocity

    def _train_nft(self, velocity, latents: torch.Tensor, adv: torch.Tensor, seed: int, reference,
                   num_samples: int) -> tuple[dict[str, list[float]], int]:
        """Backward DiffusionNFT's loss of one group (``trainer.nft.train_nft``) at ``nft_timesteps`` noise levels
        drawn from the rollout schedule; returns (stats named ``nft_*`` / ``kl``, noise levels trained)."""
        g, s = self.cfg.grpo, self.settings
        sigmas = nft.nft_timesteps(s.steps, s.shift, g.nft_timesteps, tuple(g.nft_timestep_range),
                                   generator=torch.Generator().manual_seed(seed + 2))
        old = (lambda: nft.old_policy(self.generator.dit, self._old)) if self._old is not None else None
        stats = nft.train_nft(velocity, latents.float(), adv.to(self.device), sigmas, beta=g.nft_beta,
                              adv_clip=g.adv_clip, model_dtype=self.dtype,
                              generator=torch.Generator(self.device).manual_seed(seed + 3), old=old, kl=g.nft_kl,
                              reference=reference if g.nft_kl > 0 else None,
                              loss_scale=1.0 / (len(sigmas) * num_samples), micro_batch=g.micro_batch)
        return {(k if k == "kl" else f"nft_{k}"): v for k, v in stats.items()}, len(sigmas)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[G, T, H, W, C] frames in 0..1, one video at a time (bounded VAE memory)."""
        return torch.cat([self.generator.decode(latents[i:i + 1]).float() for i in range(latents.shape[0])])

    def _reward(self, videos: torch.Tensor, prompt: _Prompt) -> dict:
        from vans.rewards import combine_group_rewards, stage2_reward

        G = self.cfg.grpo.group_size
        if self.cfg.reward.kind == "brightness":
            out = combine_group_rewards({"brightness": videos.flatten(1).mean(dim=1).cpu()}, G)
        else:
            scorer = self._scorer()
            clip_v = scorer.clip_v_group(videos, gt_features=prompt.gt_features,
                                         batch_size=self.cfg.reward.clip_batch)
            clip_t = scorer.clip_t_group(videos, prompt.anchor, batch_size=self.cfg.reward.clip_batch)
            out = stage2_reward(clip_v, clip_t, G)
        terms = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k != "skipped_groups"}
        terms["skipped"] = bool(out["num_skipped"])
        return terms


OLD_PREFIX = "nft_old."
"""Key prefix of DiffusionNFT's old policy in the checkpoints' trainable state."""


def _seed(base: int, step: int, rank: int, index: int) -> int:
    """A distinct, reproducible seed per (run seed, step, process, prompt): resume replays the same draws."""
    return (base * 1_000_003 + step * 10_007 + rank * 101 + index) % (2 ** 31)


def _frame_change(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between consecutive frames per video (falls to 0 for static copies)."""
    if videos.shape[1] < 2:
        return torch.zeros(videos.shape[0])
    return (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(dim=1).cpu()


# metric name -> runner key prefix ("reward/" is plotted; "count/" is summed over processes)
_PREFIX = {"reward": "reward/", "advantage": "adv/", "frame": "video/", "nft": "nft/"}


def _summarise(totals: dict[str, list[float]], counts: dict[str, int], seconds: dict[str, float]) -> dict[str, float]:
    """Per-step metrics in the runner's naming: ``reward/<term>_mean|_std``, ``adv/…``, ``ratio_mean``,
    ``clip_frac``, ``kl``, ``count/…`` (summed over processes), ``time/<phase>_s``."""
    out: dict[str, float] = {f"count/{k}": float(v) for k, v in counts.items()}
    if counts.get("samples"):  # headline: how often the anchor rule left a sample without a VLM anchor
        out["anchor/skip_rate"] = counts["anchor_skipped"] / counts["samples"]
        out["anchor/gt_rate"] = counts["anchor_fallbacks"] / counts["samples"]
    out.update({f"time/{k}": v for k, v in seconds.items()})
    for name, values in totals.items():
        t = torch.tensor(values, dtype=torch.float64)
        head = name.split("_", 1)[0]
        key = _PREFIX.get(head, "") + (name.split("_", 1)[1] if head in ("reward", "nft") else name)
        out[f"{key}_mean"] = float(t.mean())
        if head in ("reward", "advantage"):
            out[f"{key}_std"] = float(t.std(unbiased=False))
    for name, values in totals.items():
        t = torch.tensor(values, dtype=torch.float64)
        if name == "ratio":
            out["ratio_min"], out["ratio_max"] = float(t.min()), float(t.max())
        elif name == "advantage":
            out["adv/advantage_abs_max"] = float(t.abs().max())
        elif name == "logprob_diff":
            out["logprob_diff_max"] = float(t.max())
    if "clipped_mean" in out:
        out["clip_frac"] = out.pop("clipped_mean")
    if "kl_mean" in out:
        out["kl"] = out.pop("kl_mean")
    return out


# ----------------------------------------------------------------------------------------------------
# Command line


def train(cfg: Stage2Config, *, samples=None):
    """Build the runtime and the policy, then run the shared loop; returns the runner's ``RunResult``."""
    from .data import FeatureCache
    from .runner import run_training, setup_runtime

    cfg.validate()
    runtime = setup_runtime(cfg.run)
    cache = FeatureCache(cfg.data.cache_dir or Path(cfg.run.out_dir) / "cache")
    policy = Stage2Policy(cfg, device=runtime.device, dtype=runtime.dtype, cache=cache, rank=runtime.rank)
    return run_training(cfg, policy, runtime=runtime, samples=samples)


def main(argv: list[str] | None = None) -> int:
    import sys

    from vans.errors import VansError

    from .config import parse_cli
    from .runner import setup_logging

    setup_logging()  # the runner logs every step and an end-of-run summary with the exported files
    try:
        cfg = parse_cli(Stage2Config, argv, "python -m trainer.stage2",
                        "Stage 2 of VANS Joint-GRPO: Flow-GRPO on the Wan2.1 DiT with the stage-1 VLM frozen.")
        train(cfg)
    except VansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
