"""Joint-GRPO stage 1: train the VLM captioner (LoRA) with the video model frozen inside the reward.

    python -m trainer.stage1 --config trainer/configs/stage1.yaml [--set key=value ...] [--resume]
    accelerate launch -m trainer.stage1 --config ...        (data parallel over processes)

One step, per prompt (video, question, ground-truth caption and next-event video):

    G captions from the policy in one batched generate (``Captioner.sample_group``, sampling log-probs kept)
    → each caption rendered by the frozen Wan DiT from the cached context latents of the input clip
      (``VideoGenerator``: ``render.steps`` Euler steps, default 20; one shared initial noise per group
      so that renders differ by their caption only; ``render.batch`` videos per DiT batch, within one
      prompt's group or, with ``render.scope=step``, across all the step's prompts)
    → r1 = w_f·norm(format) + w_r·norm(ROUGE-L) + w_c·norm(CLIP-V(render, GT video))  (``vans.rewards``)
    → advantage = group-normalised r1 → token-level GRPO loss (PPO clip ε, k3 KL β against the same
      model with the adapter disabled) → backward.

Normalisation: each reward term is z-scored within its group of G ((x − mean) / (population std + 1e-4),
``vans.rewards.combine_group_rewards``) before the weighted sum, and the sum is z-scored again for the
advantage. Per-group z-scoring is what "a sum of the normalized individual rewards" (VANS App. B.1)
requires: the three terms live on different scales (format is 0/1, ROUGE-L 0..1 with small spread,
CLIP-V cosines within a few hundredths of each other), so raw sums would let the term with the largest
spread decide alone; normalising per group puts them on equal footing and keeps them independent of
the prompt's difficulty. A term with no spread in a group contributes 0 there; a group with a NaN/inf
term is skipped (zero advantage, counted in ``groups/nan_skipped``); a group whose total has no spread
carries no preference and is not trained on (``groups/zero_spread``), so it adds exactly zero gradient.

Cached once per sample (``data.FeatureCache``, keyed by file contents and settings): the context
latents of the input clip, the CLIP features of the GT video, the umT5 embedding of the negative prompt.

Render economy. The renders only rank the G captions of one prompt, and they are most of a step's cost
(20 guided steps on G rows: 2·20·G DiT rows per prompt). ``render.steps`` and ``render.guidance`` = 1 (CFG
off: one row per caption and step instead of two) trade ranking fidelity for rows;
``trainer/configs/stage1_fast.yaml`` is the measured setting (``python -m vans.bench --only train-efficiency``
prints each setting's DiT calls and rows per step and the Spearman agreement of its reward ranking with the
full render's, on the same captions). Exact savings, on by default (``render.reuse``): a caption repeated in
its group is rendered once, and the step-0 unconditional prediction, the same for the whole group (shared
noise, context and negative prompt), is computed once. Every DiT forward is counted in the step's metrics
(``render/dit_calls``, ``render/dit_rows``).
One update per rollout: π_old is the detached policy, so the logged ratio is 1 and the clip does not
fire (one update per rollout); ``logp_mismatch`` logs max |recomputed − sampling-time log-prob| as the check that
the training forward matches the sampler.

Exports (``<out_dir>/export``): ``vlm_lora.safetensors`` (the adapter, ``vans.lora.save_lora`` format,
relative to the start weights) and ``vlm_merged.safetensors`` (the whole VLM with the start checkpoint
and the adapter merged, plain layout) which ``vans.captioner.load_captioner(folder, checkpoint=...)``
and the ComfyUI VLM loader take directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vans.errors import InputError, VansError
from vans.lora import DEFAULT_TARGETS

from .config import DataConfig, OptimConfig, RunConfig, doc, parse_cli, section
from .data import FeatureCache, Sample, vae_tiling_key
from .grpo import grpo_token_loss
from .runner import Runtime, run_training, setup_logging, setup_runtime

log = logging.getLogger("vans.trainer")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class LoraSection:
    r: int = doc(8, "LoRA rank (VANS: 8)")
    alpha: float = doc(32.0, "LoRA alpha (VANS: 32); the update is scaled by alpha / r")
    dropout: float = doc(0.0, "LoRA dropout; 0 keeps the training log-probs equal to the sampling ones")
    targets: list = doc(list(DEFAULT_TARGETS), "linear layers to adapt (name suffixes)")
    exclude: list = doc(["visual"], "module path parts left alone (the vision tower by default)")


@dataclass
class RolloutSection:
    group_size: int = doc(8, "G: captions sampled per prompt (VANS: 8)")
    temperature: float = doc(0.7, "sampling temperature (official code: 0.7)")
    top_p: float = doc(0.9, "nucleus sampling threshold (official code: 0.9)")
    max_new_tokens: int = doc(256, "longest completion (official generate_grpo_samples: 256)")
    vlm_frames: int = doc(6, "frames of the input clip the VLM sees (VANS: 6)")
    min_pixels: int = doc(128 * 28 * 28, "smallest frame area for the VLM")
    max_pixels: int = doc(768 * 28 * 28, "largest frame area for the VLM")
    include_eos: bool = doc(True, "the end token is an action (the policy learns where to stop)")
    system_prompt: str = doc("official", "VLM system prompt: official (the official code's wording, which the "
                                         "released weights were trained with) or paper (the paper's App. C.2 wording)")


@dataclass
class RenderSection:
    width: int = doc(640, "rendered video width (VANS: 640)")
    height: int = doc(352, "rendered video height (VANS: 352)")
    num_frames: int = doc(33, "frames of the input clip and of the render (4n+1; VANS: 33)")
    num_context: int = doc(6, "clean context latents taken from the input clip (VANS: 6)")
    steps: int = doc(20, "denoising steps of each rollout render")
    guidance: float = doc(5.0, "classifier-free guidance scale (1 = off, half the DiT calls)")
    shift: float = doc(5.0, "flow-matching timestep shift")
    batch: int = doc(8, "captions rendered per DiT batch")
    scope: str = doc("prompt", "what one DiT batch may hold: prompt (the G captions of one prompt, render.batch at a "
                               "time) or step (the captions of all the step's prompts together, render.batch at a "
                               "time, each row with its own prompt's context): fewer, fuller DiT calls")
    reuse: bool = doc(True, "exact savings: with same_noise, a caption repeated within its group is rendered once and "
                            "the step-0 unconditional prediction (the same for the whole group) is computed once")
    frame_pick: str = doc("fps", "frames of the input and GT clips the video model / CLIP-V see: fps (the first "
                                 "num_frames at pick_fps; VANS default), first (native rate) or spread (whole clip)")
    pick_fps: float = doc(11.0, "frame rate of frame_pick=fps (VANS answers are 11 fps)")
    same_noise: bool = doc(True, "one initial noise for the whole group, so renders differ by caption only")
    offload: bool = doc(False, "keep models on the CPU between uses (saves GPU memory, costs transfers)")


@dataclass
class RewardSection:
    format_weight: float = doc(1.0, "weight of the normalised format term (VANS: 1)")
    rouge_l_weight: float = doc(1.0, "weight of the normalised ROUGE-L term (VANS: 1)")
    clip_v_weight: float = doc(1.0, "weight of the normalised CLIP-V term (VANS: 1); 0 skips rendering")
    eps: float = doc(1e-4, "added to the group std when normalising")
    clip_arch: str = doc("auto", "activation of the reward CLIP file: ViT-B-32-quickgelu (OpenAI, the paper's), "
                                 "ViT-B-32 (LAION), or auto (open_clip_config.json beside the file, else the file "
                                 "name, else OpenAI with a warning)")


@dataclass
class LossSection:
    clip_eps: float = doc(0.2, "PPO clip range epsilon (official stage-1 code: 0.2)")
    beta: float = doc(0.004, "KL weight against the adapter-disabled reference (VANS: 0.004); 0 skips the reference pass")
    loss_type: str = doc("sequence", "sequence: mean over each completion's tokens, then over completions (VANS); "
                                     "token: mean over all action tokens")


@dataclass
class ExportSection:
    adapter: bool = doc(True, "write export/vlm_lora.safetensors (the LoRA adapter)")
    merged: bool = doc(True, "write export/vlm_merged.safetensors (full VLM weights, adapter merged)")


@dataclass
class Stage1Config:
    models_dir: str = doc("", "ComfyUI models/ folder with the Qwen2.5-VL folder, Wan DiT, umT5, VAE and CLIP")
    vlm_checkpoint: str = doc("auto", "start weights applied before the adapter: auto (the VANS vlm.safetensors "
                                      "found in models_dir, if any), none, or a file path")
    dit: str = doc("", "the frozen DiT that renders the rollouts (default: found in models_dir, vdm.safetensors "
                       "first); e.g. trainer.sft_vdm's runs/sft_vdm/export/vdm_sft.safetensors")
    data: DataConfig = section(DataConfig, "dataset")
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/stage1", steps=800),
                           metadata={"help": "run length, checkpoints, devices"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5), metadata={"help": "optimizer"})
    lora: LoraSection = section(LoraSection, "LoRA adapter on the VLM")
    rollout: RolloutSection = section(RolloutSection, "caption sampling")
    render: RenderSection = section(RenderSection, "rendering captions with the frozen video model")
    reward: RewardSection = section(RewardSection, "reward r1 = format + ROUGE-L + CLIP-V")
    loss: LossSection = section(LossSection, "GRPO loss")
    export: ExportSection = section(ExportSection, "what the end of the run writes")


# ----------------------------------------------------------------------------------------------------
# Policy


def _generation_settings(render: RenderSection):
    from vans.generator import GenerationSettings

    settings = GenerationSettings(width=render.width, height=render.height, num_frames=render.num_frames,
                                  num_context=render.num_context, steps=render.steps, guidance=render.guidance,
                                  shift=render.shift)
    settings.validate()
    return settings


class VlmLoraState:
    """The TrainingPolicy weight methods of a policy that trains a LoRA adapter (``self.lora``, from
    ``vans.lora.add_lora``) on ``self.captioner.model``: stage 1 and VLM SFT."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.lora.values() for p in (m.lora_A.weight, m.lora_B.weight)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        from vans.lora import lora_state_dict

        return {k: v.clone() for k, v in lora_state_dict(self.captioner.model).items()}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        from vans.lora import load_lora_state_dict

        load_lora_state_dict(self.captioner.model, sd, strict=True)


class Stage1Policy(VlmLoraState):
    """The captioner with a LoRA adapter (trained), the frozen video model and CLIP (reward)."""

    name = "stage 1"
    memory_settings = ("rollout.group_size", "rollout.max_new_tokens", "rollout.max_pixels", "render.batch",
                       "render.width/height/num_frames", "or set render.offload=true")

    def __init__(self, cfg: Stage1Config, runtime: Runtime):
        from vans.clip import load_clip
        from vans.lora import add_lora, lora_modules
        from vans.models import require, resolve_models
        from vans.pipeline import load_models

        self.cfg = cfg
        self.runtime = runtime
        self.settings = _generation_settings(cfg.render)
        if cfg.rollout.group_size < 2:
            raise InputError(f"rollout.group_size is {cfg.rollout.group_size}; GRPO needs at least 2 (VANS: 8)")
        if cfg.render.scope not in RENDER_SCOPES:
            raise InputError(f"render.scope={cfg.render.scope!r}: must be one of {', '.join(RENDER_SCOPES)}")
        if cfg.dit and not Path(cfg.dit).is_file():
            raise InputError(f"dit file not found: {cfg.dit}; give a DiT file, or leave dit empty to use models_dir")
        paths = resolve_models(cfg.models_dir or None, dit=cfg.dit or None)
        start = self._start_checkpoint(paths)
        paths = dataclasses.replace(paths, vlm_checkpoint=start)
        require(paths, ("vlm", "dit", "text_encoder", "vae", "clip"), cfg.models_dir or None)
        self.paths = paths
        models = load_models(paths, device=runtime.device, dtype=runtime.dtype, offload=cfg.render.offload)
        self.captioner, self.generator = models.captioner, models.generator
        self.captioner.to(runtime.device)
        for module in (self.generator.dit, self.generator.text_encoder, self.generator.vae):
            module.requires_grad_(False)
        self.clip = load_clip(paths.clip, arch=cfg.reward.clip_arch, device=runtime.device)
        torch.manual_seed(cfg.run.seed)  # the same adapter init on every process
        add_lora(self.captioner.model, cfg.lora.targets, r=cfg.lora.r, alpha=cfg.lora.alpha,
                 dropout=cfg.lora.dropout, exclude=cfg.lora.exclude, dtype=torch.float32)
        self.lora = lora_modules(self.captioner.model)
        self.cache = FeatureCache(cfg.data.cache_dir or Path(cfg.run.out_dir) / "cache")

    def set_render(self, render: RenderSection) -> None:
        """Render the next steps' captions with other ``render`` settings (the render-economy benchmark)."""
        self.settings = _generation_settings(render)
        self.cfg.render = render

    def _start_checkpoint(self, paths) -> Path | None:
        return start_vlm_checkpoint(self.cfg.vlm_checkpoint, paths)

    # -- cached per-sample inputs -----------------------------------------------------------------------

    def _frame_pick(self):  # the VDM's view of the input and GT clips (vans.video.FramePick)
        from .data import frame_pick

        return frame_pick(self.cfg.render, "render")

    def _context(self, sample: Sample) -> torch.Tensor:
        from vans.video import read_clip

        s, pick = self.settings, self._frame_pick()

        def compute():
            clip = read_clip(sample.video, s.num_frames, s.height, s.width, pick, what="input video")
            return self.generator.encode_context(clip.frames, s.num_context).float().cpu()

        key = (Path(sample.video), Path(self.paths.vae), s.height, s.width, s.num_frames, s.num_context,
               str(self.runtime.dtype), pick.mode, pick.fps, vae_tiling_key(self.generator.vae))
        return self.cache.get_or_compute("context", key, compute).to(self.runtime.device, self.runtime.dtype)

    def _gt_features(self, sample: Sample) -> torch.Tensor:
        from vans.video import read_clip

        s, pick = self.settings, self._frame_pick()

        def compute():  # the GT clip seen as the renders are: same frames, same crop (as vans eval)
            clip = read_clip(sample.gt_video, s.num_frames, s.height, s.width, pick, what="ground-truth video")
            return self.clip.image_features(clip.frames).float().cpu()

        key = (Path(sample.gt_video), Path(self.paths.clip), self.clip.arch, s.height, s.width, s.num_frames,
               pick.mode, pick.fps)
        return self.cache.get_or_compute("gt_clip", key, compute)

    def _negative_prompt(self) -> None:
        """Put the cached umT5 embedding of the negative prompt into the generator's text cache."""
        text = self.settings.negative_prompt
        if self.settings.guidance == 1.0 or self.generator.cached_text(text) is not None:
            return

        def compute():
            return self.generator.encode_text([text])[0].float().cpu()

        emb = self.cache.get_or_compute("text", (Path(self.paths.text_encoder), text, str(self.runtime.dtype)), compute)
        self.generator.remember_text(text, emb)

    # -- rollout ----------------------------------------------------------------------------------------

    def _sample_group(self, sample: Sample):
        from vans.prompts import system_prompt_text
        from vans.video import read_video

        r = self.cfg.rollout
        clip = read_video(sample.video, num_frames=r.vlm_frames, min_frames=1, what="input video")
        return self.captioner.sample_group(
            clip.frames, sample.question, r.group_size, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, seed=None, num_frames=r.vlm_frames, min_pixels=r.min_pixels,
            max_pixels=r.max_pixels, include_eos=r.include_eos, system_prompt=system_prompt_text(r.system_prompt))

    @torch.no_grad()
    def render(self, groups: list[tuple[Sample, list[str]]], step: int) -> list[list[torch.Tensor]]:
        """The frozen VDM's video [T, H, W, 3] for each caption of each (sample, captions) group of a step, from the
        sample's cached context; group ``index`` (its position) seeds its initial noise. DiT batches of at most
        ``render.batch`` captions, within one group (``render.scope`` prompt) or across the step's groups (step);
        with ``render.reuse`` and ``same_noise`` a repeated caption is rendered once (the same caption from the
        same noise and context is the same video)."""
        r, s, gen = self.cfg.render, self.settings, self.generator
        self._negative_prompt()
        rows: list[tuple[int, str, torch.Tensor]] = []  # (group, caption, initial noise [1, ...]) per distinct render
        owners: list[list[int]] = []  # per group: the row rendering each of its captions
        contexts = []
        for index, (sample, captions) in enumerate(groups):
            contexts.append(self._context(sample))
            seed = (self.cfg.run.seed * 1_000_003 + step * 997 + index) % 2**63
            noise = gen.initial_noise(1 if r.same_noise else len(captions), s, seed=seed)
            seen: dict = {}
            mine = []
            for j, caption in enumerate(captions):
                key = caption if r.reuse and r.same_noise else j
                if key not in seen:
                    seen[key] = len(rows)
                    rows.append((index, caption, noise[0 if r.same_noise else j].unsqueeze(0)))
                mine.append(seen[key])
            owners.append(mine)
        videos: list[torch.Tensor] = []
        for chunk in _render_chunks(rows, max(1, r.batch), by_group=r.scope == "prompt"):
            owner = rows[chunk[0]][0]  # one group: its context is shared (batch 1); several: one context per row
            one_group = all(rows[i][0] == owner for i in chunk)
            context = contexts[owner] if one_group else torch.cat([contexts[rows[i][0]] for i in chunk])
            emb = gen.encode_text([rows[i][1] for i in chunk])
            noise = torch.cat([rows[i][2] for i in chunk])
            result = gen.sample(context, emb, s, noise=noise, share_uncond=r.reuse and r.same_noise)
            videos.extend(gen.decode(result.latents).float())
        return [[videos[i] for i in mine] for mine in owners]

    def _clip_v(self, groups: list[tuple[Sample, object]], step: int) -> list[torch.Tensor]:
        """CLIP-V of each group's renders against its sample's GT video (zeros when the term is off)."""
        if self.cfg.reward.clip_v_weight == 0:
            return [torch.zeros(group.group_size) for _, group in groups]
        videos = self.render([(sample, [r.caption for r in group.responses]) for sample, group in groups], step)
        return [self.clip.clip_v_group(v, gt_features=self._gt_features(sample)) for v, (sample, _) in
                zip(videos, groups)]

    def rewards(self, sample: Sample, group, clip_v: torch.Tensor) -> dict:
        """``vans.rewards.stage1_reward`` terms, the weighted sum of the normalised terms, its advantage."""
        from vans.rewards import group_advantages, stage1_reward

        w = self.cfg.reward
        out = stage1_reward(group.texts, [sample.caption], clip_v, group.group_size, w.eps)
        total = w.format_weight * out["format_norm"] + w.rouge_l_weight * out["rouge_l_norm"] \
            + w.clip_v_weight * out["clip_v_norm"]
        out["total_raw"] = w.format_weight * out["format"] + w.rouge_l_weight * out["rouge_l"] \
            + w.clip_v_weight * out["clip_v"]
        out["advantages"] = group_advantages(total, group.group_size, w.eps)
        return out

    # -- train ------------------------------------------------------------------------------------------

    def group_loss(self, group, advantages: torch.Tensor) -> tuple[torch.Tensor, dict, float]:
        """(loss, stats, logp mismatch) of one group; the loss has a graph into the adapter."""
        from vans.lora import adapters_disabled

        loss_cfg = self.cfg.loss
        model = self.captioner.model
        model.train()
        try:
            logp = self.captioner.completion_logprobs(group)
            ref = None
            if loss_cfg.beta:
                with torch.no_grad(), adapters_disabled(model):
                    ref = self.captioner.completion_logprobs(group)
        finally:
            model.eval()
        mask = group.action_mask.to(logp.device)
        loss, stats = grpo_token_loss(logp, logp.detach(), ref, advantages.to(logp.device), mask,
                                      loss_cfg.clip_eps, loss_cfg.beta, loss_cfg.loss_type)
        sampled = group.logprobs.to(logp.device)
        mismatch = float(((logp.detach() - sampled).abs() * mask).max()) if mask.any() else 0.0
        return loss, stats, mismatch

    def step(self, batch: list[Sample], step: int) -> dict:
        t0 = time.perf_counter()
        groups = [(sample, self._sample_group(sample)) for sample in batch]
        t1 = time.perf_counter()
        calls, rows = self.generator.dit_calls, self.generator.dit_rows
        clip_v = self._clip_v(groups, step)
        timings = {"rollout": t1 - t0, "render": time.perf_counter() - t1, "train": 0.0,
                   "dit_calls": self.generator.dit_calls - calls, "dit_rows": self.generator.dit_rows - rows}
        rollouts = [(group, self.rewards(sample, group, v)) for (sample, group), v in zip(groups, clip_v)]
        self.generator.clear_text_cache()

        stats_all, mismatches, zero_spread, nan_groups, trained = [], [], 0, 0, 0
        t0 = time.perf_counter()
        for group, reward in rollouts:
            if reward["num_skipped"]:
                nan_groups += 1
                log.warning("step %d: a group has a non-finite reward term; it is skipped", step)
                continue
            if not bool(reward["advantages"].abs().gt(0).any()):
                zero_spread += 1
                continue
            loss, stats, mismatch = self.group_loss(group, reward["advantages"])
            (loss / len(batch)).backward()
            stats["loss"] = float(loss.detach())
            stats_all.append(stats)
            mismatches.append(mismatch)
            trained += 1
        timings["train"] = time.perf_counter() - t0
        return self._metrics(rollouts, stats_all, mismatches, zero_spread, nan_groups, trained, timings)

    @staticmethod
    def _metrics(rollouts, stats_all, mismatches, zero_spread, nan_groups, trained, timings) -> dict:
        def mean(values):
            values = [v for v in values if torch.isfinite(torch.tensor(v))]
            return sum(values) / len(values) if values else float("nan")

        cat = {k: torch.cat([r[k] for _, r in rollouts]) for k in ("format", "rouge_l", "clip_v", "total_raw",
                                                                     "advantages")}
        finite = torch.isfinite(cat["total_raw"])
        adv = cat["advantages"]
        metrics = {
            "reward/total": float(cat["total_raw"][finite].mean()) if finite.any() else float("nan"),
            "reward/format": float(cat["format"][finite].mean()) if finite.any() else float("nan"),
            "reward/rouge_l": float(cat["rouge_l"][finite].mean()) if finite.any() else float("nan"),
            "reward/clip_v": float(cat["clip_v"][finite].mean()) if finite.any() else float("nan"),
            "adv/mean": float(adv.mean()), "adv/std": float(adv.std(unbiased=False)),
            "adv/abs_max": float(adv.abs().max()),
            "groups/total": len(rollouts), "groups/trained": trained, "groups/zero_spread": zero_spread,
            "groups/nan_skipped": nan_groups,
            "tokens/mean_len": mean([float(n) for g, _ in rollouts for n in g.lengths]),
            "time/rollout_s": timings["rollout"], "time/render_s": timings["render"], "time/train_s": timings["train"],
            "render/dit_calls": timings["dit_calls"], "render/dit_rows": timings["dit_rows"],
        }
        for key in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "kl", "pg_loss", "kl_loss", "loss"):
            default = 1.0 if key.startswith("ratio") else 0.0  # no group trained: nothing moved
            metrics[key] = mean([s[key] for s in stats_all]) if stats_all else default
        metrics["logp_mismatch"] = max(mismatches) if mismatches else 0.0
        return metrics

    # -- export -----------------------------------------------------------------------------------------

    def export(self, out_dir: Path) -> dict[str, str]:
        return export_vlm(self.captioner.model, out_dir, base_model=self.paths.vlm, start=self.paths.vlm_checkpoint,
                          adapter=self.cfg.export.adapter, merged=self.cfg.export.merged, stage="1")


def start_vlm_checkpoint(choice: str, paths) -> Path | None:
    """The ``vlm_checkpoint`` setting as a file: auto (the VANS vlm.safetensors in models_dir, if any), none, a path."""
    if choice in ("", "none"):
        return None
    if choice == "auto":
        return paths.vlm_checkpoint
    path = Path(choice).expanduser()
    if not path.is_file():
        raise InputError(f"vlm_checkpoint file not found: {path}; give a path, auto or none")
    return path


EXPORT_NAMES = ("vlm_lora.safetensors", "vlm_merged.safetensors")  # (adapter, merged) under <out_dir>/export


def export_vlm(model, out_dir: Path, *, base_model, start, adapter: bool, merged: bool, stage: str,
               names: tuple[str, str] = EXPORT_NAMES) -> dict[str, str]:
    """Write the adapter (``vans.lora.save_lora``, start recorded) and/or the merged VLM, and export.json."""
    from vans.checkpoints import save_state_dict, start_checkpoint_metadata
    from vans.lora import merged_state_dict, save_lora

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_meta = start_checkpoint_metadata(start)
    start = start_meta["start_checkpoint"]
    written = {}
    if adapter:  # a delta on the start weights: loading it applies the recorded start first
        written["adapter"] = str(save_lora(model, out_dir / names[0], extra_metadata={**start_meta, "stage": stage}))
    if merged:
        written["merged"] = str(save_state_dict(merged_state_dict(model), out_dir / names[1],
                                                metadata={"format": "vans-merged", "start_checkpoint": start,
                                                          "stage": stage}))
    info = {"base_model": str(base_model), "start_checkpoint": start, **written,
            "load": "vans.captioner.load_captioner(base_model, checkpoint=merged)"}
    (out_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return written


def _render_chunks(rows: list[tuple], size: int, *, by_group: bool) -> list[list[int]]:
    """Indices of ``rows`` (group index first) in DiT batches of at most ``size``, in order; ``by_group``: a batch
    never mixes groups."""
    chunks: list[list[int]] = []
    for i, row in enumerate(rows):
        last = chunks[-1] if chunks else None
        if last is None or len(last) == size or (by_group and rows[last[0]][0] != row[0]):
            chunks.append([i])
        else:
            last.append(i)
    return chunks


RENDER_SCOPES = ("prompt", "step")


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    setup_logging()  # the runner logs every step and an end-of-run summary with the exported files
    try:
        cfg = parse_cli(Stage1Config, argv, "python -m trainer.stage1",
                        "Joint-GRPO stage 1: GRPO on the VLM captioner (LoRA), video model frozen in the reward.")
        runtime = setup_runtime(cfg.run)
        run_training(cfg, Stage1Policy(cfg, runtime), runtime=runtime)
    except VansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
