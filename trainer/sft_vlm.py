"""VLM SFT: LoRA supervised fine-tuning of Qwen2.5-VL on VANS (video, question, think, caption) rows.

    python -m trainer.sft_vlm --config trainer/configs/sft_vlm.yaml [--set key=value ...] [--resume]
    accelerate launch -m trainer.sft_vlm --config ...        (data parallel over processes)

Paper settings (VANS App. C.1): LoRA r 8 / α 32 on q,k,v,o,gate,up,down, lr 5e-5, 10K steps; the
official ``agent_mllm.py`` LoraConfig adds dropout 0.05 and, as PEFT matches target names as suffixes,
also adapts the vision tower's MLPs (``lora.exclude: []`` here; ``[visual]`` freezes the tower as stage 1
does). Batch size and optimizer are not published.

One sample, exactly as inference sees it (``vans.captioner.Captioner.prepare``, the engine's own prompt
building): ``input.vlm_frames`` (6) frames spread over the whole clip (``read_video`` as stage 1's rollouts;
a shorter clip repeats frames), each resized to an area in [min_pixels, max_pixels] (128·28² .. 768·28²),
the system prompt (``official`` wording by default) and the [video, question] user turn, then the
generation prompt ``<|im_start|>assistant\\n``. The target after it is the official SFT string
``[Think]{think}[/Think][Ans]{caption}[/Ans]<|im_end|>`` (``<|im_end|>`` is the tokenizer's end token and
one of the ids ``generate`` stops at). Labels are −100 on every prompt token (the official code masks the
tokens up to its first ``assistant`` token; the ``\\n`` of the generation prompt, a constant, is masked here
too, since inference supplies it) and the loss is the cross-entropy of the target tokens.

Loss reduction: the sum of the target tokens' negative log-likelihoods over the whole optimizer step
(every micro-batch of ``train.micro_batch`` samples, every process) divided by the number of those
tokens, so gradient accumulation and the number of processes change nothing but rounding.

Validation (``val.every``; also at step 1, before any update, and at the last step): the same loss on the
held-out split (rows whose ``split`` column says val/test/..., else a seeded ``data.heldout_fraction``),
reported as ``val/loss``, computed inside ``step`` before its backward, i.e. for the weights after step − 1
updates; and greedy captions of the first ``val.captions`` held-out samples with their ROUGE-L against the GT caption
(``val/rouge_l``) and the format rule (``val/format``), written to ``<out_dir>/val_samples.jsonl``.

Exports (``<out_dir>/export``, by ``trainer.stage1.export_vlm``): ``vlm_sft_lora.safetensors`` (the adapter,
start weights recorded) and ``vlm_sft_merged.safetensors`` (the whole VLM with the adapter merged), which
``vans answer --vlm-checkpoint``, the ComfyUI VLM loader (from ``models/LLM``) and stage 1's
``vlm_checkpoint`` read; ``heldout.json`` holds the final held-out figures when validation is on.

The held-out split keys are ``trainer.config.HeldoutDataConfig``, shared with ``trainer.sft_vdm``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vans.errors import InputError, VansError

from .config import HeldoutDataConfig, OptimConfig, RunConfig, doc, parse_cli, section
from .data import Sample, load_samples, split_samples
from .runner import Runtime, run_training, setup_logging, setup_runtime
from .stage1 import ExportSection, LoraSection, VlmLoraState, export_vlm, start_vlm_checkpoint

log = logging.getLogger("vans.trainer")

EXPORT_NAMES = ("vlm_sft_lora.safetensors", "vlm_sft_merged.safetensors")
END_TOKEN = "<|im_end|>"  # the official SFT target ends with it; Qwen's chat turns end with it
IGNORE = -100  # label of a token that is not trained on (the prompt, padding)
_TAGS = ("[Think]", "[/Think]", "[Ans]", "[/Ans]")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class InputSection:
    vlm_frames: int = doc(6, "frames of the input clip the VLM sees, spread over the clip (VANS: 6)")
    min_pixels: int = doc(128 * 28 * 28, "smallest frame area for the VLM (official: 128·28·28)")
    max_pixels: int = doc(768 * 28 * 28, "largest frame area for the VLM (official: 768·28·28)")
    system_prompt: str = doc("official", "VLM system prompt: official (the official code's wording) or paper "
                                         "(the paper's App. C.2 wording); inference must use the same")


@dataclass
class TrainSection:
    micro_batch: int = doc(1, "samples per forward/backward; a step's samples (run.prompts_per_step over the "
                              "processes) are split into micro-batches whose gradients add up (accumulation)")
    gradient_checkpointing: bool = doc(False, "recompute each layer's activations in the backward (transformers' "
                                              "gradient checkpointing: less memory, about a third more compute)")


@dataclass
class ValSection:
    every: int = doc(500, "validate on the held-out split every N steps, at step 1 and at the last step (0 = never)")
    max_samples: int = doc(0, "held-out samples in the validation loss (0 = all)")
    captions: int = doc(4, "held-out samples whose caption is generated (greedy) and scored by ROUGE-L (0 = none)")
    max_new_tokens: int = doc(256, "longest generated validation response")


@dataclass
class SftLoraSection(LoraSection):
    dropout: float = doc(0.05, "LoRA dropout (official: 0.05); validation and generation run without it")
    exclude: list = doc([], "module path parts left alone: [] also adapts the vision tower's MLPs (the official PEFT "
                            "suffix match), [visual] freezes the vision tower (faster, as stage 1)")


@dataclass
class SftExportSection(ExportSection):
    adapter: bool = doc(True, f"write export/{EXPORT_NAMES[0]} (the LoRA adapter, its start weights recorded)")
    merged: bool = doc(True, f"write export/{EXPORT_NAMES[1]} (full VLM weights, adapter merged)")


@dataclass
class SftVlmConfig:
    models_dir: str = doc("", "ComfyUI models/ folder with the Qwen2.5-VL folder (models/LLM/Qwen2.5-VL-3B-Instruct)")
    vlm_checkpoint: str = doc("none", "start weights applied before the adapter: none (the base Qwen2.5-VL, as the "
                                      "paper's SFT), auto (the VANS vlm.safetensors in models_dir), or a file path")
    data: HeldoutDataConfig = section(HeldoutDataConfig, "dataset and held-out split")
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/sft_vlm", steps=10_000, prompts_per_step=8,
                                                             save_every=500),
                           metadata={"help": "run length, batch (run.prompts_per_step samples per step), devices"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5), metadata={"help": "optimizer"})
    lora: SftLoraSection = section(SftLoraSection, "LoRA adapter on the VLM (official: r 8, alpha 32, dropout 0.05)")
    input: InputSection = section(InputSection, "what the VLM sees (as inference)")
    train: TrainSection = section(TrainSection, "micro-batches and memory")
    val: ValSection = section(ValSection, "validation on the held-out split")
    export: SftExportSection = section(SftExportSection, "what the end of the run writes")


# ----------------------------------------------------------------------------------------------------
# Data (shared by both SFT stages)


def sft_target(think: str, caption: str) -> str:
    """The official SFT response text (the end token is appended as an id)."""
    return f"[Think]{think}[/Think][Ans]{caption}[/Ans]"


def _sft_problem(sample: Sample) -> str | None:
    from vans.prompts import validate_question

    if not sample.think:
        return ("empty think (ENG_Think / think): the target is [Think]think[/Think][Ans]caption[/Ans] and an "
                "empty reasoning block fails the format rule stage 1 rewards")
    for name in ("think", "caption"):
        tag = next((t for t in _TAGS if t in getattr(sample, name)), None)
        if tag:
            return f"{name} contains the tag {tag}, which would break the [Think]/[Ans] format"
    try:
        validate_question(sample.question)
    except InputError as exc:
        return str(exc)
    return None


def load_split(data: HeldoutDataConfig, *, require_think: bool) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) samples of ``data.path``: ``load_samples`` (bad rows skipped and listed), then, with
    ``require_think``, rows unusable as a VLM target skipped the same way, then ``split_samples``."""
    report = load_samples(data.path, data.video_root or None, check_videos=data.check_videos,
                          max_samples=data.max_samples)
    samples = report.samples
    if require_think:
        kept = []
        for sample in samples:
            problem = _sft_problem(sample)
            if problem:
                report.skipped.append((sample.id, problem))
                log.warning("dataset %s row %s skipped: %s", Path(data.path).name, sample.id, problem)
            else:
                kept.append(sample)
        if not kept:
            raise InputError(f"dataset {data.path} has no row usable for VLM SFT ({report.summary()}); every row "
                             "needs a question, a think and a caption")
        samples = kept
    train, heldout = split_samples(samples, data.heldout_fraction, data.heldout_seed)
    log.info("dataset %s: %d training and %d held-out samples, %d rows skipped", Path(data.path).name, len(train),
             len(heldout), len(report.skipped))
    return train, heldout


# ----------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Example:
    """One tokenized sample: the engine's prompt (with the video's pixel patches) and the target ids."""

    sample: Sample
    prompt: object  # vans.captioner.PromptInputs
    target: list[int]  # response tokens, the end token last

    @property
    def length(self) -> int:
        return self.prompt.length + len(self.target)


def collate(examples: list[Example], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded model inputs of several examples and their labels (−100 on the prompt and padding).
    Videos are concatenated in example order, as the processor does for a batch."""
    width = max(e.length for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    has_types = "mm_token_type_ids" in examples[0].prompt.tensors
    types = torch.zeros_like(input_ids)
    for row, e in enumerate(examples):
        n, p = e.length, e.prompt.length
        target = torch.tensor(e.target, dtype=torch.long)
        input_ids[row, :p], input_ids[row, p:n] = e.prompt.input_ids[0], target
        attention[row, :n] = 1
        labels[row, p:n] = target
        if has_types:
            types[row, :p] = e.prompt.tensors["mm_token_type_ids"][0]
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    if has_types:
        inputs["mm_token_type_ids"] = types
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        inputs[key] = torch.cat([e.prompt.tensors[key] for e in examples])
    return inputs, labels


# ----------------------------------------------------------------------------------------------------
# Policy


class SftVlmPolicy(VlmLoraState):
    """The captioner (base + start checkpoint, frozen) with a trainable LoRA adapter."""

    name = "sft_vlm"
    memory_settings = ("train.micro_batch", "input.max_pixels", "input.vlm_frames",
                       "or set train.gradient_checkpointing=true")

    def __init__(self, cfg: SftVlmConfig, runtime: Runtime, heldout: list[Sample] | None = None):
        from vans.captioner import load_captioner
        from vans.lora import add_lora, lora_modules
        from vans.models import require, resolve_models
        from vans.prompts import system_prompt_text

        self.cfg, self.runtime = cfg, runtime
        self.heldout = list(heldout or [])
        self._check_settings()
        self.system_prompt = system_prompt_text(cfg.input.system_prompt)
        paths = resolve_models(cfg.models_dir or None)
        require(paths, ("vlm",), cfg.models_dir or None)
        self.base_model = paths.vlm
        self.start = start_vlm_checkpoint(cfg.vlm_checkpoint, paths)
        self.captioner = load_captioner(paths.vlm, checkpoint=self.start, dtype=runtime.dtype, device=runtime.device)
        tokenizer = self.captioner.processor.tokenizer
        self.tokenizer = tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        if self.end_id is None or self.end_id == tokenizer.unk_token_id:
            raise InputError(f"the tokenizer of {paths.vlm} has no {END_TOKEN} token; use a Qwen2.5-VL Instruct folder")
        self.pad_id = self.captioner.pad_token_id if self.captioner.pad_token_id is not None else self.end_id
        torch.manual_seed(cfg.run.seed)  # the same adapter init on every process
        add_lora(self.captioner.model, cfg.lora.targets, r=cfg.lora.r, alpha=cfg.lora.alpha,
                 dropout=cfg.lora.dropout, exclude=cfg.lora.exclude, dtype=torch.float32)
        self.lora = lora_modules(self.captioner.model)
        if cfg.train.gradient_checkpointing:
            self.captioner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.captioner.model.eval()
        if cfg.val.every and not self.heldout:
            log.warning("no held-out samples (no split column and data.heldout_fraction = 0): validation is off")

    def _check_settings(self) -> None:
        cfg = self.cfg
        for key, value in (("train.micro_batch", cfg.train.micro_batch), ("lora.r", cfg.lora.r),
                           ("val.max_new_tokens", cfg.val.max_new_tokens)):
            if value < 1:
                raise InputError(f"{key} is {value}; use at least 1")
        for key, value in (("val.every", cfg.val.every), ("val.captions", cfg.val.captions),
                           ("val.max_samples", cfg.val.max_samples)):
            if value < 0:
                raise InputError(f"{key} is {value}; use 0 (off / all) or a positive number")

    # -- examples and the loss ------------------------------------------------------------------------

    def target_ids(self, sample: Sample) -> list[int]:
        text = sft_target(sample.think, sample.caption)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.end_id]

    def _frames(self, sample: Sample) -> torch.Tensor:
        from vans.video import read_video

        return read_video(sample.video, num_frames=self.cfg.input.vlm_frames, min_frames=1, what="input video").frames

    def example(self, sample: Sample) -> Example:
        i = self.cfg.input
        prompt = self.captioner.prepare(self._frames(sample), sample.question, num_frames=i.vlm_frames,
                                        min_pixels=i.min_pixels, max_pixels=i.max_pixels,
                                        system_prompt=self.system_prompt)
        return Example(sample, prompt, self.target_ids(sample))

    def _autocast(self):
        device, dtype = self.runtime.device, self.runtime.dtype
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def nll(self, examples: list[Example]) -> tuple[torch.Tensor, int]:
        """(sum of the target tokens' negative log-likelihoods, number of target tokens) of one micro-batch;
        differentiable when grad is enabled."""
        from vans.captioner import _token_logprobs

        inputs, labels = collate(examples, self.pad_id)
        device = self.runtime.device
        vision_dtype = next(self.captioner.model.model.visual.parameters()).dtype
        kwargs = {k: v.to(device=device, dtype=vision_dtype) if k == "pixel_values_videos" else v.to(device)
                  for k, v in inputs.items()}
        labels = labels.to(device)
        with self._autocast():
            hidden = self.captioner.model.model(**kwargs, use_cache=False).last_hidden_state
            # the hidden state at position p predicts token p + 1
            targets = labels[:, 1:]
            mask = targets != IGNORE
            chosen = hidden[:, :-1][mask].unsqueeze(0)
            no_ban = torch.zeros(0, dtype=torch.long, device=device)  # plain cross-entropy over the whole vocabulary
            logp = _token_logprobs(chosen, self.captioner.model.lm_head, targets[mask].unsqueeze(0), 1.0, no_ban)
        return -logp.sum(), int(mask.sum())

    def _micro_batches(self, samples: list[Sample]):
        size = self.cfg.train.micro_batch
        for start in range(0, len(samples), size):
            yield [self.example(s) for s in samples[start:start + size]]

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        if not self.runtime.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.runtime.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    # -- train ----------------------------------------------------------------------------------------

    def step(self, batch: list[Sample], step: int) -> dict:
        metrics = self.validate(step) if self._validation_due(step) else {}
        t0 = time.perf_counter()
        tokens = sum(len(self.target_ids(s)) for s in batch)
        (total_tokens,) = self._sum_over_processes([float(tokens)])
        # the runner averages gradients over processes: × world_size makes the result the sum over every
        # process's tokens divided by their total count
        scale = self.runtime.world_size / max(total_tokens, 1.0)
        model = self.captioner.model
        loss_sum = 0.0
        model.train()
        try:
            for examples in self._micro_batches(batch):
                nll, _ = self.nll(examples)
                (nll * scale).backward()
                loss_sum += float(nll.detach())
        finally:
            model.eval()
        (loss_total,) = self._sum_over_processes([loss_sum])
        metrics.update({"loss": loss_total / max(total_tokens, 1.0), "count/target_tokens": tokens,
                        "count/samples": len(batch), "time/train_s": time.perf_counter() - t0})
        return metrics

    # -- validation -----------------------------------------------------------------------------------

    def _validation_due(self, step: int) -> bool:
        every = self.cfg.val.every
        return bool(every and self.heldout) and (step == 1 or step % every == 0 or step == self.cfg.run.steps)

    @torch.no_grad()
    def heldout_loss(self, samples: list[Sample], *, shard: bool = True) -> float:
        """Token-mean cross-entropy of the targets of ``samples`` (this process's share when ``shard``,
        summed over processes), eval mode (no dropout)."""
        rank, world = (self.runtime.rank, self.runtime.world_size) if shard else (0, 1)
        total, count = 0.0, 0
        self.captioner.model.eval()
        for examples in self._micro_batches(samples[rank::world]):
            nll, n = self.nll(examples)
            total, count = total + float(nll), count + n
        if shard:
            total, count = self._sum_over_processes([total, float(count)])
        return total / count if count else float("nan")

    def generate(self, sample: Sample):
        """The greedy response to a held-out sample (``vans.captioner.CaptionResult``)."""
        i = self.cfg.input
        return self.captioner.caption(self._frames(sample), sample.question, temperature=0.0,
                                      max_new_tokens=self.cfg.val.max_new_tokens, seed=None, num_frames=i.vlm_frames,
                                      min_pixels=i.min_pixels, max_pixels=i.max_pixels,
                                      system_prompt=self.system_prompt, decoding="policy")

    def caption_scores(self, samples: list[Sample]) -> tuple[dict, list[dict]]:
        """Mean ROUGE-L of the greedy captions against the GT captions, the format rate, one record per sample."""
        from vans.prompts import is_well_formed
        from vans.rewards import rouge_l_batch

        results = [self.generate(s) for s in samples]
        scores = rouge_l_batch([r.caption for r in results], [s.caption for s in samples])
        records = [{"id": s.id, "caption": r.caption, "target": s.caption, "rouge_l": score, "raw": r.raw}
                   for s, r, score in zip(samples, results, scores)]
        return {"val/rouge_l": sum(scores) / len(scores),
                "val/format": sum(is_well_formed(r.raw) for r in results) / len(results)}, records

    def evaluate(self, *, shard: bool = True) -> tuple[dict, list[dict]]:
        """Held-out loss (all processes) and, on the main process, the generated captions' scores."""
        val = self.cfg.val
        samples = self.heldout[:val.max_samples] if val.max_samples else self.heldout
        metrics, records = {"val/loss": self.heldout_loss(samples, shard=shard)}, []
        if val.captions and (self.runtime.is_main or not shard):
            scores, records = self.caption_scores(self.heldout[:val.captions])
            metrics.update(scores)
        return metrics, records

    def validate(self, step: int) -> dict:
        t0 = time.perf_counter()
        metrics, records = self.evaluate()
        metrics["time/val_s"] = time.perf_counter() - t0
        if self.runtime.is_main and records:  # the metrics appear in the runner's line of this step
            for record in records[:2]:
                log.info("step %d held-out %s: %r (target %r)", step, record["id"], record["caption"], record["target"])
            self._write_samples(step, records)
        return metrics

    def _write_samples(self, step: int, records: list[dict]) -> None:
        """Append this step's captions to val_samples.jsonl, dropping rows of this step or later (a resume)."""
        from vans.files import atomic_write_text

        path = Path(self.cfg.run.out_dir) / "val_samples.jsonl"
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) < step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        kept += [json.dumps({"step": step, **r}, ensure_ascii=False) for r in records]
        atomic_write_text(path, "\n".join(kept) + "\n")

    # -- export ---------------------------------------------------------------------------------------

    def export(self, out_dir: Path) -> dict[str, str]:
        written = export_vlm(self.captioner.model, out_dir, base_model=self.base_model, start=self.start,
                             adapter=self.cfg.export.adapter, merged=self.cfg.export.merged, stage="sft_vlm",
                             names=EXPORT_NAMES)
        if self.cfg.val.every and self.heldout:  # the final weights' held-out figures (main process only)
            metrics, records = self.evaluate(shard=False)
            path = Path(out_dir) / "heldout.json"
            path.write_text(json.dumps({"metrics": metrics, "samples": records}, indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")
            log.info("final held-out: %s", " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            written["heldout"] = str(path)
        return written


# ----------------------------------------------------------------------------------------------------
# Command line


def bench(scale: str, device, work, overrides=()) -> dict:
    """One timed optimizer step of ``sft_vlm.yaml`` (``sft_vlm_tiny.yaml`` at the tiny scale) on random weights of
    the real sizes (``vans.fixtures.random_models``) and the benchmark's synthetic 720p clip (the VLM's full
    768·28² pixels per frame), one sample per step: seconds per phase, target tokens and peak memory, and the
    projection to the config's samples per step. ``python -m trainer.sft_vlm bench --out DIR``."""
    from vans.bench import _run_stage, _stage_config
    from vans.fixtures.random_models import RandomModels

    device, work = torch.device(device), Path(work)
    models = RandomModels(scale, work / "models", device=device)
    cfg, out = _stage_config(SftVlmConfig, "sft_vlm", scale, device, work, models.tree,
                             ("val.every=0", "data.heldout_fraction=0", "vlm_checkpoint=none"), list(overrides))
    out.update(stage="sft_vlm", scale=scale, device=str(device), micro_batch=cfg.train.micro_batch,
               gradient_checkpointing=cfg.train.gradient_checkpointing, frames=cfg.input.vlm_frames,
               max_pixels=cfg.input.max_pixels, lora_exclude=list(cfg.lora.exclude))
    m = _run_stage(lambda runtime: SftVlmPolicy(cfg, runtime), cfg, models, device, out)
    out["phases_s"] = {k[len("time/"):-2]: v for k, v in m.items() if k.startswith("time/")}
    out["target_tokens"] = m.get("count/target_tokens")
    p = out["yaml_prompts_per_step"]
    out[f"projected_step_s_with_{p}_samples_per_step"] = p * (m.get("time/step_s") or 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .sft_vdm import bench_cli

        return bench_cli("python -m trainer.sft_vlm bench", bench, argv[1:])
    setup_logging()  # the runner logs every step and an end-of-run summary with the exported files
    try:
        cfg = parse_cli(SftVlmConfig, argv, "python -m trainer.sft_vlm",
                        "VLM SFT: LoRA fine-tuning of Qwen2.5-VL on [Think]think[/Think][Ans]caption[/Ans] targets.")
        runtime = setup_runtime(cfg.run)
        train, heldout = load_split(cfg.data, require_think=True)
        run_training(cfg, SftVlmPolicy(cfg, runtime, heldout), runtime=runtime, samples=train)
    except VansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
