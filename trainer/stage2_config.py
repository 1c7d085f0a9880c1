"""The settings of stage 2 (``python -m trainer.stage2``): one dataclass per YAML section, each key documented with
its source. ``trainer.stage2`` re-exports them; ``Stage2Config.validate`` refuses contradictory settings with one
line naming the key.

Algorithms and step selections (``grpo.algorithm``, ``grpo.step_selection``; the math is in
``trainer.flow_grpo`` and ``trainer.nft``):

* ``flow_grpo`` + ``all`` — the paper's (VANS §6.3, Flow-GRPO): SDE at every rollout step, K − 1 trained steps.
* ``flow_grpo`` + ``window`` — Flow-GRPO-Fast (flow_grpo README): one ODE prefix per group, G SDE branches for
  ``window_size`` (2) trained steps, ODE after: the fewest DiT calls of the likelihood-ratio modes.
* ``flow_grpo`` + ``sliding`` — MixGRPO (arXiv 2507.21802): the same branching with a window of 4 that moves
  over the schedule during the run, so every noise level is trained at a window's cost.
* ``nft`` — DiffusionNFT (arXiv 2509.16117): ODE rollouts, no likelihood; the cheapest per iteration.

CFG-free training: for ``flow_grpo`` the training forward must be the rollout's exact velocity (else the
first ratio is not 1 and the 1e-3 clip clips everything), so its only CFG-free form is ``video.guidance: 1``
in rollout and training (flow_grpo's ``*_nocfg`` configs); "guidance at rollout only" is refused. ``nft``
supervises clean latents, so it may train the conditional velocity on guided rollouts
(``grpo.train_guidance: none``; Flow-Factory trains DGPO that way) or run CFG-free everywhere (its paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vans.errors import InputError

from . import flow_grpo
from .config import DataConfig, OptimConfig, RunConfig, doc, section

ALGORITHMS = ("flow_grpo", "nft")
TRAIN_GUIDANCE = ("rollout", "none")


@dataclass
class Stage2RunConfig(RunConfig):
    out_dir: str = doc("runs/stage2", "output folder: checkpoints/, metrics.jsonl, tensorboard/, plots, export/")
    steps: int = doc(1000, "optimizer steps of the whole run (VANS: 1,000 for stage 2)")


@dataclass
class ModelSection:
    train_mode: str = doc("lora", "lora (adapters on the DiT, KL reference = adapters off) or full (every DiT "
                                  "weight trains, KL reference = a frozen copy; use run.dtype=fp32 for it)")
    lora_rank: int = doc(32, "LoRA rank r (Flow-GRPO Wan: 32)")
    lora_alpha: float = doc(64.0, "LoRA alpha; the update is scaled by alpha / rank (Flow-GRPO Wan: 64)")
    lora_targets: str = doc("attn", "adapted linears in every block: attn (self + cross attention q, k, v, o), "
                                    "attn+ffn, or comma-separated suffixes such as attn1.to_q,attn1.to_v")
    gradient_checkpointing: bool = doc(False, "recompute the DiT blocks in the backward pass (less memory, "
                                              "about 30% more time)")


@dataclass
class VideoSection:
    width: int = doc(640, "rollout width in pixels (multiple of 16; VANS 640)")
    height: int = doc(352, "rollout height in pixels (multiple of 16; VANS 352)")
    num_frames: int = doc(33, "frames of the input clip and of each rollout (4n+1; VANS 33)")
    num_context: int = doc(6, "clean context latents taken from the input clip (VANS 6)")
    steps: int = doc(20, "denoising steps K of a rollout (Flow-GRPO Wan: 20; inference uses 50)")
    guidance: float = doc(5.0, "classifier-free guidance scale in rollouts and training forwards (1 = off, "
                               "half the DiT calls)")
    shift: float = doc(5.0, "flow-matching schedule shift (Wan: 5)")
    negative_prompt: str = doc("", "negative prompt for CFG (empty = Wan's default negative prompt)")
    frame_pick: str = doc("fps", "frames of the input and GT clips the video model / CLIP-V see: fps (the first "
                                 "num_frames at pick_fps; VANS default), first (native rate) or spread (whole clip)")
    pick_fps: float = doc(11.0, "frame rate of frame_pick=fps (VANS answers are 11 fps)")


@dataclass
class GrpoSection:
    algorithm: str = doc("flow_grpo", "flow_grpo (the paper's: likelihood ratio of SDE steps, PPO clip, KL) or nft "
                                      "(DiffusionNFT, arXiv 2509.16117: ODE rollouts, advantage-weighted flow "
                                      "matching on the clean rollout latents; no log-probs, no reference)")
    group_size: int = doc(8, "G: rollouts per prompt (VANS 8)")
    noise_level: float = doc(0.7, "SDE noise level a (Flow-GRPO default 0.7); must be > 0 for flow_grpo "
                                  "(nft samples with the ODE and ignores it)")
    same_noise: bool = doc(False, "start all G rollouts of a group from one initial noise (they still branch "
                                  "at every SDE step); window and sliding always share one noise per group, so "
                                  "it does not apply to them")
    step_selection: str = doc("all", "flow_grpo trained steps: all (SDE everywhere, every step but the last "
                                     "trained; the paper's); fraction (SDE everywhere, train a random "
                                     "train_fraction of the steps, DanceGRPO); window (Flow-GRPO-Fast: one ODE "
                                     "trajectory per group up to a branch step drawn inside `window`, G SDE "
                                     "branches for window_size trained steps, ODE after); sliding (MixGRPO: the "
                                     "same branching, the window start moves by slide_stride every slide_every "
                                     "optimizer steps and rolls back to 0 after K - 2). nft ignores it")
    train_fraction: float = doc(0.6, "share of the K steps trained when step_selection=fraction (DanceGRPO 0.6)")
    window: list = doc([0.0, 0.5], "range of branch steps for step_selection=window, as fractions of K "
                                   "(0 = pure noise; Flow-GRPO-Fast: the first half)")
    window_size: int = doc(0, "SDE + trained steps per group for window / sliding; 0 = the mode's default: 2 "
                              "for window (Flow-GRPO-Fast README: 1-2), 4 for sliding (MixGRPO)")
    slide_every: int = doc(25, "step_selection=sliding: optimizer steps before the window moves (MixGRPO "
                               "iters_per_group 25)")
    slide_stride: int = doc(1, "step_selection=sliding: steps the window moves each time (MixGRPO "
                               "prog_overlap_step 1; 0 keeps it at the first steps)")
    train_guidance: str = doc("rollout", "velocity the training forward computes: rollout (the rollout's own, "
                                         "guided when video.guidance > 1; required by flow_grpo, whose ratio "
                                         "must start at exactly 1: its CFG-free form is video.guidance=1 in "
                                         "rollout and training) or none (the conditional velocity only; nft, "
                                         "trained on guided rollouts, as Flow-Factory's DGPO)")
    clip_range: float = doc(1e-3, "flow_grpo: PPO clip ε on the per-step probability ratio (VANS / Flow-GRPO "
                                  "Wan: 1e-3)")
    beta: float = doc(0.004, "flow_grpo: weight of the KL between the policy's and the reference's Gaussian "
                             "step means (VANS 0.004; 0 skips the reference forward)")
    adv_clip: float = doc(5.0, "clip advantages to ±adv_clip (Flow-GRPO 5; nft: A_max of its reward weight)")
    micro_batch: int = doc(0, "rows per training forward (0 = the whole group, the rollout's batch size, which "
                              "keeps the first ratio exactly 1; smaller saves memory)")
    nft_beta: float = doc(0.1, "nft: β of the implicit positive / negative policies v± (Flow-Factory Wan2.1 "
                               "0.1; DiffusionNFT paper 1.0)")
    nft_timesteps: int = doc(4, "nft: noise levels trained per group, one stratified draw from the rollout's "
                                "schedule (Flow-Factory Wan2.1 4)")
    nft_timestep_range: list = doc([0.0, 0.9], "nft: the range they are drawn from, as fractions of the "
                                               "trajectory from pure noise (Flow-Factory timestep_range 0.9)")
    nft_old_decay_max: float = doc(0.5, "nft: the old policy is an EMA of the trained weights with decay "
                                        "min(max(step - nft_old_flat, 0)·nft_old_ramp, nft_old_decay_max) "
                                        "(DiffusionNFT default / Flow-Factory Wan2.1: 0, 0.001, 0.5); 0 = the "
                                        "old policy is the current one (one forward fewer per noise level)")
    nft_old_ramp: float = doc(0.001, "nft: growth of the old policy's EMA decay per optimizer step")
    nft_old_flat: int = doc(0, "nft: optimizer steps before the old policy's EMA decay starts to grow")
    nft_off_policy: bool = doc(True, "nft: sample the rollouts with the old policy (DiffusionNFT, Flow-Factory "
                                     "off_policy); false samples with the current weights")
    nft_kl: float = doc(0.0, "nft: weight of ⟨(v - v_ref)²⟩ against the reference (adapters off / frozen "
                             "copy); DiffusionNFT 1e-4, Flow-Factory Wan2.1 0")

    def sizes(self) -> int:
        """The window size in force (``window_size``, or the mode's default when 0)."""
        if self.window_size > 0:
            return self.window_size
        return 4 if self.step_selection == "sliding" else 2

    def old_policy_moves(self) -> bool:
        """nft with an old policy that lags the current weights (a decay that ever becomes > 0)."""
        return self.algorithm == "nft" and self.nft_old_decay_max > 0 and self.nft_old_ramp > 0


@dataclass
class AnchorSection:
    source: str = doc("vlm", "vlm (the frozen stage-1 VLM writes the anchor caption) or gt (use the "
                             "ground-truth caption; no VLM is loaded)")
    min_rouge: float = doc(0.6, "accept a VLM caption once its ROUGE-L against the GT caption reaches this "
                                "(VANS: discard and resample below 0.6)")
    max_tries: int = doc(4, "VLM captions drawn per sample before the sample counts as a miss (one draw when "
                            "the decoding is deterministic: more draws would repeat it)")
    on_miss: str = doc("skip", "what a sample whose anchors all miss min_rouge does: skip (no rollouts; with reuse "
                               "the miss is kept like an accepted anchor, so the sample stays skipped; the paper keeps "
                               "only anchors >= min_rouge) or gt (train on the GT caption)")
    decoding: str = doc("official", "official (the authors' inference: the VLM folder's generation config with "
                                    "temperature/top_p set; greedy when that file sets top_k 1) or policy (plain "
                                    "temperature + top-p sampling, which makes resampling meaningful)")
    system_prompt: str = doc("official", "VLM system prompt: official (the official code's wording, the released "
                                         "weights') or paper (the paper's App. C.2 wording)")
    temperature: float = doc(0.7, "VLM sampling temperature (VANS inference 0.7)")
    top_p: float = doc(0.9, "VLM nucleus sampling top_p")
    max_new_tokens: int = doc(512, "VLM token budget (thinking + answer)")
    num_frames: int = doc(6, "frames the VLM sees (VANS 6)")
    reuse: bool = doc(True, "keep a sample's accepted anchor for later visits (the VLM is frozen); false "
                            "draws a new one every visit")


@dataclass
class RewardSection:
    kind: str = doc("clip", "clip: r2 = norm(CLIP-V vs GT video) + norm(CLIP-T vs anchor) (VANS); brightness: "
                            "mean pixel value of the rollout video (a sanity check that the loop learns)")
    clip_arch: str = doc("auto", "activation of the reward CLIP file: ViT-B-32-quickgelu (OpenAI, the paper's), "
                                 "ViT-B-32 (LAION), or auto (open_clip_config.json beside the file, else the file "
                                 "name, else OpenAI with a warning)")
    clip_batch: int = doc(64, "frames per CLIP forward")


@dataclass
class ExportSection:
    dtype: str = doc("bf16", "dtype of the exported files: bf16, fp16 or fp32")
    lora_name: str = doc("vans_stage2_lora.safetensors", "ComfyUI LoRA file (train_mode=lora), for core "
                                                         "LoraLoaderModelOnly on a Wan2.1-T2V-1.3B model")
    merged_name: str = doc("vdm.safetensors", "merged DiT in the original Wan key layout, for core "
                                              "'Load Diffusion Model' and the VANS nodes")


@dataclass
class Stage2Config:
    models_dir: str = doc("", "ComfyUI-style models/ folder with the DiT, umT5, VAE, VLM and reward CLIP "
                              "(see vans.models.ROLES for the file names)")
    dit: str = doc("", "DiT file to start from (default: found in models_dir); e.g. the VANS vdm.safetensors")
    vlm: str = doc("", "Qwen2.5-VL folder (default: found in models_dir)")
    vlm_checkpoint: str = doc("", "stage-1 VLM export: runs/stage1/export/vlm_merged.safetensors, or vlm_lora.safetensors (its "
                                        "recorded start checkpoint is applied first); default: vlm.safetensors in models_dir")
    clip: str = doc("", "reward CLIP file (default: found in models_dir)")
    data: DataConfig = section(DataConfig, "dataset")
    run: Stage2RunConfig = section(Stage2RunConfig, "run length, output, checkpoints, device")
    optim: OptimConfig = section(OptimConfig, "optimizer (VANS stage 2: lr 5e-5)")
    model: ModelSection = section(ModelSection, "what trains on the DiT")
    video: VideoSection = section(VideoSection, "rollout shape and sampler")
    grpo: GrpoSection = section(GrpoSection, "GRPO settings: the algorithm, its trained steps and loss")
    anchor: AnchorSection = section(AnchorSection, "anchor caption from the frozen VLM")
    reward: RewardSection = section(RewardSection, "stage-2 reward")
    export: ExportSection = section(ExportSection, "files written at the end for ComfyUI")

    def validate(self) -> None:
        self.generation_settings().validate()
        if self.grpo.group_size < 2:
            raise InputError(f"grpo.group_size={self.grpo.group_size}: GRPO needs at least 2 rollouts per prompt")
        g = self.grpo
        if g.algorithm not in ALGORITHMS:
            raise InputError(f"grpo.algorithm={g.algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        if g.train_guidance not in TRAIN_GUIDANCE:
            raise InputError(f"grpo.train_guidance={g.train_guidance!r}: use one of {', '.join(TRAIN_GUIDANCE)}")
        if g.algorithm == "flow_grpo" and g.noise_level <= 0:
            raise InputError(f"grpo.noise_level={g.noise_level}: Flow-GRPO needs an SDE (e.g. 0.7)")
        if g.algorithm == "flow_grpo" and g.train_guidance == "none" and self.video.guidance != 1.0:
            raise InputError(f"grpo.train_guidance=none with video.guidance={self.video.guidance}: flow_grpo must "
                             "train the rollout's guided velocity; for CFG-free flow_grpo set video.guidance=1")
        if g.algorithm == "nft":
            if g.same_noise:
                raise InputError("grpo.same_noise=true with grpo.algorithm=nft: ODE rollouts from one noise are "
                                 "identical, so the group has no reward spread; set same_noise=false")
            if g.nft_beta <= 0 or g.adv_clip <= 0 or g.nft_timesteps < 1:
                raise InputError(f"grpo.nft_beta={g.nft_beta}, grpo.adv_clip={g.adv_clip}, grpo.nft_timesteps="
                                 f"{g.nft_timesteps}: nft needs nft_beta > 0, adv_clip > 0, nft_timesteps >= 1")
            if len(g.nft_timestep_range) != 2:
                raise InputError(f"grpo.nft_timestep_range={g.nft_timestep_range}: give [start, end] fractions")
            if not 0 <= g.nft_old_decay_max < 1 or g.nft_old_ramp < 0 or g.nft_old_flat < 0:
                raise InputError(f"grpo.nft_old_decay_max={g.nft_old_decay_max}, nft_old_ramp={g.nft_old_ramp}, "
                                 f"nft_old_flat={g.nft_old_flat}: need 0 <= decay_max < 1, ramp >= 0, flat >= 0")
            from .nft import nft_timesteps

            try:
                nft_timesteps(self.video.steps, self.video.shift, g.nft_timesteps, tuple(g.nft_timestep_range))
            except InputError as exc:
                raise InputError(f"grpo.{exc}") from None
        if self.anchor.source not in ("vlm", "gt"):
            raise InputError(f"anchor.source={self.anchor.source!r}: use vlm or gt")
        if self.anchor.on_miss not in ("skip", "gt"):
            raise InputError(f"anchor.on_miss={self.anchor.on_miss!r}: use skip or gt")
        from vans.captioner import DECODING_MODES

        if self.anchor.decoding not in DECODING_MODES:
            raise InputError(f"anchor.decoding={self.anchor.decoding!r}: use one of {', '.join(DECODING_MODES)}")
        from vans.clip import ARCH_CHOICES
        from vans.prompts import system_prompt_text

        from .data import frame_pick

        try:
            system_prompt_text(self.anchor.system_prompt)
        except InputError as exc:
            raise InputError(f"anchor.{exc}") from None
        frame_pick(self.video, "video")
        if self.reward.clip_arch not in ARCH_CHOICES:
            raise InputError(f"reward.clip_arch={self.reward.clip_arch!r}: use one of {', '.join(ARCH_CHOICES)}")
        if self.reward.kind not in ("clip", "brightness"):
            raise InputError(f"reward.kind={self.reward.kind!r}: use clip or brightness")
        if len(self.grpo.window) != 2:
            raise InputError(f"grpo.window={self.grpo.window}: give [start, end] as fractions of the steps")
        try:
            self.plan(0)
        except InputError as exc:
            raise InputError(f"grpo.{exc}") from None

    def plan(self, step: int, generator: torch.Generator | None = None) -> flow_grpo.StepPlan:
        """The flow_grpo step plan of one group after ``step`` optimizer steps (``trainer.flow_grpo.plan_steps``)."""
        g = self.grpo
        return flow_grpo.plan_steps(self.video.steps, g.step_selection, fraction=g.train_fraction,
                                    window=tuple(g.window), window_size=g.sizes(), generator=generator, step=step,
                                    slide_every=g.slide_every, slide_stride=g.slide_stride)

    def generation_settings(self, seed: int = 0):
        from vans.generator import WAN_NEGATIVE_PROMPT, GenerationSettings

        v = self.video
        return GenerationSettings(width=v.width, height=v.height, num_frames=v.num_frames,
                                  num_context=v.num_context, steps=v.steps, guidance=v.guidance, shift=v.shift,
                                  seed=seed, negative_prompt=v.negative_prompt or WAN_NEGATIVE_PROMPT,
                                  noise_level=0.0 if self.grpo.algorithm == "nft" else self.grpo.noise_level)
