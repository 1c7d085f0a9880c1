"""Stage 2 (Flow-GRPO on the Wan DiT, VLM frozen) on the tiny random-weight models, CPU."""

from __future__ import annotations

import pytest
import torch

from trainer import stage2
from trainer.config import load_config
from trainer.data import load_samples
from trainer.metrics import read_metrics
from trainer.runner import run_training, setup_runtime
from trainer.stage2 import Stage2Config, Stage2Policy
from vans import progress
from vans.errors import InputError
from trainer_fixtures import CONFIGS, demo_dataset, demo_models, tiny_overrides  # noqa: F401

# A reward the tiny VDM can move: the mean brightness of the decoded rollout (no CLIP, no VLM). 4 rollout
# steps, of which 3 train ("all" leaves out the final sigma -> 0 step, as Flow-GRPO).
LEARN = ("anchor.source=gt", "reward.kind=brightness", "video.guidance=1.0", "video.width=16", "video.height=16",
         "video.steps=4", "grpo.group_size=8", "grpo.same_noise=true", "run.prompts_per_step=1",
         "run.save_every=1000", "run.plot=false")


def make(out_dir, models, data, *extra):
    cfg = load_config(Stage2Config, CONFIGS / "stage2_tiny.yaml", tiny_overrides(out_dir, models, data, *extra))
    runtime = setup_runtime(cfg.run)
    return cfg, Stage2Policy(cfg, device=runtime.device, dtype=runtime.dtype, rank=runtime.rank), runtime


def train(cfg, policy, runtime, samples=None):
    with progress.quiet():
        return run_training(cfg, policy, runtime=runtime, samples=samples)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_models, demo_dataset):
    """The tiny config as shipped (VLM anchors, CLIP reward, CFG), 2 steps of 2 prompts."""
    out = tmp_path_factory.mktemp("stage2") / "run"
    cfg, policy, runtime = make(out, demo_models, demo_dataset, "run.steps=2", "run.save_every=1",
                                "anchor.max_tries=1")
    result = train(cfg, policy, runtime)
    return cfg, policy, result


def test_tiny_run_logs_every_term_and_the_first_ratio_is_one(trained):
    cfg, _, result = trained
    assert result.finished and result.last_step == 2
    rows = read_metrics(cfg.run.out_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward/clip_v_mean", "reward/clip_t_mean", "reward/total_mean", "adv/advantage_std",
                    "ratio_mean", "clip_frac", "kl", "count/zero_spread_groups", "count/anchor_fallbacks",
                    "time/rollout_s", "time/train_s", "time/decode_s", "time/reward_s", "mem/peak_mb",
                    "video/frame_change_mean", "grad_norm"):
            assert key in row, key
        # one update per rollout: every trained transition is on-policy, recomputed bit for bit
        assert row["logprob_diff_max"] == 0.0 and row["ratio_min"] == row["ratio_max"] == 1.0
        assert row["clip_frac"] == 0.0
        assert row["count/groups"] == 2 and row["count/trained_steps"] == 2 * (cfg.video.steps - 1)
        # the raw r2 = CLIP-V + CLIP-T, not the group-normalised reward (whose mean is always about 0)
        assert row["reward/total_mean"] == pytest.approx(row["reward/clip_v_mean"] + row["reward/clip_t_mean"])
        assert row["reward/total_mean"] > 0.05
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the policy left the reference after the first update
    # random tiny VLM: its captions never reach ROUGE-L 0.6, so with the tiny config's on_miss=gt every
    # anchor fell back to the GT caption after max_tries sampled draws
    assert rows[0]["count/anchor_fallbacks"] == 2 and rows[0]["count/anchor_vlm_calls"] == 2 * cfg.anchor.max_tries
    assert rows[0]["anchor/gt_rate"] == 1.0 and rows[0]["anchor/skip_rate"] == 0.0


def test_anchor_misses_skip_the_sample_by_default_never_substituting_gt(tmp_path, demo_models, demo_dataset, caplog):
    """The paper keeps only anchors with ROUGE-L >= 0.6: a sample whose draws all miss trains nothing."""
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, "run.steps=1", "anchor.on_miss=skip",
                                "anchor.max_tries=3")
    with caplog.at_level("INFO", logger="vans.trainer"):
        train(cfg, policy, runtime)
    row = read_metrics(cfg.run.out_dir)[0]
    assert row["count/anchor_skipped"] == 2 and row["count/anchor_fallbacks"] == 0
    assert row["count/groups"] == 0 and row["count/trained_steps"] == 0
    assert row["count/anchor_vlm_calls"] == 2 * 3  # policy decoding: three different draws per sample
    assert row["anchor/skip_rate"] == 1.0
    assert "anchor/skip_rate 1" in caplog.text  # a headline of the step log line


def test_deterministic_official_anchor_decoding_draws_once(tmp_path, demo_models, demo_dataset):
    """With the official decoding a folder config with top_k 1 (the release-era Qwen2.5-VL-3B-Instruct file) makes
    every draw the same caption: one draw per sample, not max_tries identical ones."""
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, "run.steps=1", "anchor.on_miss=skip",
                                "anchor.max_tries=3", "anchor.decoding=official")
    policy._load_captioner().release_generation_config.top_k = 1
    train(cfg, policy, runtime)
    row = read_metrics(cfg.run.out_dir)[0]
    assert row["count/anchor_vlm_calls"] == 2 and row["count/anchor_skipped"] == 2


def test_tiny_run_writes_checkpoints_and_comfyui_exports(trained):
    from safetensors import safe_open

    cfg, policy, result = trained
    files = {k: str(v) for k, v in result.exports.items()}
    assert set(files) == {"lora", "dit"}
    with safe_open(files["lora"], "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["format"] == "vans-dit-lora"
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert len(keys) == 3 * len(policy.trainable_state_dict()) // 2
    ckpts = sorted(p.name for p in (result.out_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000001", "step_00000002"]


def test_anchor_is_redrawn_until_rouge_passes(trained, demo_dataset):
    _, policy, _ = trained
    sample = load_samples(demo_dataset).samples[0]

    class Captioner:
        calls = 0

        def caption(self, frames, question, **kwargs):
            Captioner.calls += 1
            text = "unrelated words" if Captioner.calls < 3 else sample.caption + " today"
            return type("R", (), {"caption": text})()

        def offload(self):
            return self

        def is_deterministic(self, decoding, temperature):
            return False

    policy._captioner, policy._anchors = Captioner(), {}
    policy.cfg.anchor.max_tries = 4
    anchor, tries, fallback = policy._anchor(sample, seed=0)
    assert (anchor, tries, fallback) == (sample.caption + " today", 3, False)
    assert policy._anchor(sample, seed=1) == (anchor, 0, False) and Captioner.calls == 3  # reused, not redrawn
    policy._anchors = {}
    policy.cfg.anchor.max_tries = 2
    Captioner.calls = -10
    policy.cfg.anchor.on_miss = "gt"
    assert policy._anchor(sample, seed=0) == (sample.caption, 2, True)  # bounded tries, then the GT caption if asked
    policy._anchors, Captioner.calls = {}, -10
    policy.cfg.anchor.on_miss = "skip"
    assert policy._anchor(sample, seed=0) == (None, 2, False)  # by default: no anchor, the sample is skipped


def test_zero_spread_group_gives_no_gradient(tmp_path, demo_models, demo_dataset):
    cfg, policy, _ = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, "grpo.group_size=4")
    policy._reward = lambda videos, prompt: {"reward": torch.full((videos.shape[0],), 0.5), "skipped": False}
    metrics = policy.step(load_samples(demo_dataset).samples[:1], 1)
    assert metrics["count/zero_spread_groups"] == 1 and metrics["count/trained_steps"] == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.trainable_parameters())


def _eval_brightness(policy, samples) -> float:
    """Mean brightness of ODE samples from fixed noise (deterministic: equal weights give equal numbers)."""
    settings = policy.cfg.generation_settings()
    settings.noise_level = 0.0
    values = []
    with torch.no_grad(), progress.quiet():
        for sample in samples:
            noise = policy.generator.initial_noise(4, settings, seed=123)
            cond = policy.generator.encode_text([sample.caption])
            latents = policy.generator.sample(policy._context(sample), cond, settings, noise=noise).latents
            values.append(policy._decode(latents).mean().item())
    return sum(values) / len(values)


# The default mode (flow_grpo, SDE at every step, K - 1 = 3 trained), G = 8, one prompt per step, 32 steps at lr 6e-3,
# on every seed of SEEDS. Measured on run seeds 0-4: gain / initial spread 3.36 3.47 7.10 5.46 5.32 (bound 1.5),
# last-4 minus first-4 mean rollout reward / spread 3.80 3.59 6.93 5.14 4.84 (bound 0.5); on seeds 5-9 (not run
# here) 4.49 2.43 5.10 4.40 2.94 and 3.97 2.13 3.60 3.05 2.32. 16 steps passed seeds 0-4 (min 2.45) but not 6 and 9
# (0.82, 0.70), 8 steps not seed 4 (0.59): one 8-row group per step gives a noisy gradient, which more steps
# average. Multiplying the initial LoRA weights by 1 + 1e-6·N(0, 1) changed no margin in the second decimal (the
# rollout noise is seeded; every map is continuous). About 90 s wall for the 5 seeds on 2 threads.
SEEDS = (0, 1, 2, 3, 4)


def test_stage2_raises_a_reward_the_tiny_model_can_move(tmp_path, demo_models, demo_dataset):
    margins = []
    for seed in SEEDS:
        cfg, policy, runtime = make(tmp_path / f"run_{seed}", demo_models, demo_dataset, *LEARN, "run.steps=32",
                                    "optim.lr=6e-3", f"run.seed={seed}")
        samples = load_samples(demo_dataset).samples
        before = _eval_brightness(policy, samples[:2])
        train(cfg, policy, runtime, samples)
        after = _eval_brightness(policy, samples[:2])
        rows = read_metrics(cfg.run.out_dir)
        rewards = [r["reward/brightness_mean"] for r in rows]
        spread = rows[0]["reward/brightness_std"]  # how much G rollouts of one prompt differ at the start
        margins.append((seed, (after - before) / spread, (sum(rewards[-4:]) / 4 - sum(rewards[:4]) / 4) / spread))
        assert all(r["ratio_mean"] == 1.0 for r in rows)
        assert all(r["reward/total_mean"] == pytest.approx(r["reward/brightness_mean"]) for r in rows)
    # (seed, gain / spread, later - earlier rewards / spread) per seed; the lr-0 control is
    # test_stage2_with_lr_zero_changes_nothing
    assert all(gain > 1.5 and later > 0.5 for _, gain, later in margins), margins


def test_text_encoder_is_not_moved_when_every_text_is_cached(tmp_path, demo_models, demo_dataset, monkeypatch):
    cfg, policy, _ = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, "video.guidance=2.0")
    encoder, moves = policy.generator.text_encoder, []
    real_to = encoder.to
    monkeypatch.setattr(encoder, "to", lambda *a, **k: moves.append(a) or real_to(*a, **k))
    sample = load_samples(demo_dataset).samples[0]
    first = policy._prepare(sample, 0, stage2._Timer(policy.device))
    assert moves  # the anchor and the negative prompt had to be encoded
    moves.clear()
    again = policy._prepare(sample, 1, stage2._Timer(policy.device))
    assert moves == [] and torch.equal(again.cond, first.cond)
    assert policy.generator.cached_text(cfg.generation_settings().negative_prompt) is not None


def test_context_latents_on_the_device_are_a_bounded_lru(tmp_path, demo_models, demo_dataset):
    cfg = load_config(Stage2Config, CONFIGS / "stage2_tiny.yaml",
                      tiny_overrides(tmp_path / "run", demo_models, demo_dataset, *LEARN))
    policy = Stage2Policy(cfg, context_cache_size=2)
    samples = load_samples(demo_dataset).samples[:3]
    contexts = [policy._context(s) for s in samples]
    assert len(policy._contexts) == 2 and policy._contexts.get((samples[0].id, samples[0].video)) is None
    assert torch.equal(policy._context(samples[0]), contexts[0])  # evicted: read back from the feature cache
    assert policy.cache.misses == 3 and policy.cache.hits == 1


def test_stage2_with_lr_zero_changes_nothing(tmp_path, demo_models, demo_dataset):
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, "run.steps=2", "optim.lr=0")
    samples = load_samples(demo_dataset).samples[:2]
    start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    before = _eval_brightness(policy, samples)
    train(cfg, policy, runtime, load_samples(demo_dataset).samples)
    assert _eval_brightness(policy, samples) == before
    assert all(torch.equal(v, start[k]) for k, v in policy.trainable_state_dict().items())
    rows = read_metrics(cfg.run.out_dir)
    assert all(r["grad_norm"] > 0 and r["kl"] == 0.0 for r in rows)  # gradients flowed, the policy did not move


def test_full_fine_tune_step_and_merged_export(tmp_path, demo_models, demo_dataset):
    from vans.wan import load_dit

    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, "run.steps=1",
                                "model.train_mode=full", "optim.lr=1e-3")
    assert policy.frozen is not None
    assert len(policy.trainable_parameters()) == len(list(policy.generator.dit.parameters()))
    result = train(cfg, policy, runtime)
    assert set(result.exports) == {"dit"}
    merged = load_dit(result.exports["dit"], dtype=torch.float32)
    trained = policy.generator.dit.state_dict()
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, trained[k])]
    assert not moved  # the export holds exactly the trained weights (fp32 export)
    assert not all(torch.equal(a, b) for a, b in zip(policy.frozen.parameters(), policy.generator.dit.parameters()))


def test_resume_replays_the_uninterrupted_run(tmp_path, demo_models, demo_dataset):
    # VLM anchors kept for later visits (anchor.reuse, the default): 2 of the 4 samples per step, so step 3
    # after the resume revisits step 1's samples, whose anchors the resumed process did not draw itself
    quick = (*LEARN, "anchor.source=vlm", "anchor.max_new_tokens=8", "grpo.group_size=4", "run.prompts_per_step=2",
             "run.steps=3", "run.save_every=1", "optim.lr=1e-3")
    whole = make(tmp_path / "whole", demo_models, demo_dataset, *quick)
    train(*whole)
    first = make(tmp_path / "split", demo_models, demo_dataset, *quick, "run.stop_at=2")
    assert not train(*first).finished
    second = make(tmp_path / "split", demo_models, demo_dataset, *quick)
    second[0].run.resume = True
    assert train(*second).finished
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time", "mem/"))} for r in rows]

    resumed, uninterrupted = strip(read_metrics(tmp_path / "split")), strip(read_metrics(tmp_path / "whole"))
    assert [r["count/anchor_vlm_calls"] for r in uninterrupted] == [2 * whole[0].anchor.max_tries] * 2 + [0]
    assert resumed == uninterrupted  # count/anchor_vlm_calls included: the anchors came with the checkpoint
    for k, v in whole[1].trainable_state_dict().items():
        assert torch.equal(v, second[1].trainable_state_dict()[k]), k


def test_two_processes_split_the_groups_with_accelerate_launch(tmp_path, demo_models, demo_dataset):
    from trainer_fixtures import launch_two_processes

    out = tmp_path / "ddp"
    args = ["--config", str(CONFIGS / "stage2_tiny.yaml"), *sum((["--set", o] for o in tiny_overrides(
        out, demo_models, demo_dataset, *LEARN, "grpo.group_size=4", "run.steps=2", "run.prompts_per_step=2")), [])]
    done = launch_two_processes(["-m", "trainer.stage2", *args], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["count/groups"] == 2 and r["ratio_mean"] == 1.0 for r in rows)  # one group per process, summed
    assert (out / "export" / "vans_stage2_lora.safetensors").is_file()


def test_cli_help_and_bad_settings(capsys):
    with pytest.raises(SystemExit):
        stage2.main(["--help"])
    text = capsys.readouterr().out
    for key in ("grpo.clip_range", "grpo.beta", "grpo.step_selection", "anchor.min_rouge", "model.train_mode",
                "export.lora_name", "video.steps", "optim.lr"):
        assert key in text, key
    assert load_config(Stage2Config, CONFIGS / "stage2.yaml").grpo.clip_range == 1e-3
    with pytest.raises(InputError, match="grpo.clip_range"):
        load_config(Stage2Config, None, ["grpo.clip_rang=0.1"])
    for override, match in (("grpo.group_size=1", "group_size"), ("grpo.noise_level=0", "noise_level"),
                            ("anchor.source=human", "anchor.source"), ("grpo.step_selection=best", "selection"),
                            ("video.num_frames=8", "num_frames")):
        with pytest.raises(InputError, match=match):
            load_config(Stage2Config, None, [override]).validate()
    assert stage2.main(["--set", "models_dir=/nonexistent", "--set", "run.device=cpu"]) == 2
