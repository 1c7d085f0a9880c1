"""Stage 1 (GRPO on the VLM, VDM frozen) on the tiny random-weight models, CPU."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer.config import load_config
from trainer.data import load_samples, write_demo_dataset
from trainer.grpo import grpo_token_loss
from trainer.metrics import read_metrics
from trainer.runner import run_training, setup_runtime
from trainer.stage1 import Stage1Config, Stage1Policy
from vans import progress
from vans.errors import InputError
from trainer_fixtures import CONFIGS, REPO, demo_dataset, demo_models, tiny_overrides  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are too small to gain from intra-op threads; on a shared 2-core box they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(out_dir, models, data, *extra):
    cfg = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml", tiny_overrides(out_dir, models, data, *extra))
    runtime = setup_runtime(cfg.run)
    return cfg, Stage1Policy(cfg, runtime), runtime


def train(cfg, policy, runtime):
    with progress.quiet():
        return run_training(cfg, policy, runtime=runtime)


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "mem/"))} for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_models, demo_dataset):
    out = tmp_path_factory.mktemp("stage1") / "run"
    cfg, policy, runtime = make(out, demo_models, demo_dataset, "run.steps=2", "run.save_every=1")
    result = train(cfg, policy, runtime)
    return cfg, policy, result


@pytest.fixture(scope="module")
def group(trained, demo_dataset):
    _, policy, _ = trained
    torch.manual_seed(5)
    with progress.quiet():
        return policy._sample_group(load_samples(demo_dataset).samples[0])


def _logprobs(captioner, group):
    with torch.no_grad(), progress.quiet():
        return captioner.completion_logprobs(group)


def test_metrics_checkpoints_and_ratio(trained):
    cfg, _, result = trained
    rows = read_metrics(result.out_dir)
    assert [r["step"] for r in rows] == [1, 2] and result.finished
    for key in ("reward/total", "reward/format", "reward/rouge_l", "reward/clip_v", "adv/mean", "adv/std",
                "ratio_mean", "clip_frac", "kl", "groups/zero_spread", "groups/nan_skipped", "time/rollout_s",
                "time/render_s", "time/train_s", "mem/peak_mb", "logp_mismatch", "lr", "grad_norm"):
        assert key in rows[0], key
    assert rows[0]["ratio_mean"] == rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0  # first on-policy ratio
    assert rows[0]["clip_frac"] == 0.0 and rows[0]["kl"] == 0.0  # adapter B = 0: policy = reference at step 1
    assert rows[0]["logp_mismatch"] < 1e-3  # training forward reproduces the sampler's log-probs
    assert 0.0 < rows[0]["reward/clip_v"] <= 1.0 and rows[1]["kl"] > 0.0
    assert [p.name for p in (result.out_dir / "checkpoints").iterdir()] and (result.out_dir / "config.yaml").is_file()
    assert set(result.exports) == {"adapter", "merged"}


def test_reference_is_the_base_model(trained, group, demo_models):
    from vans.captioner import load_captioner
    from vans.lora import adapters_disabled

    _, policy, _ = trained
    base = load_captioner(policy.paths.vlm, checkpoint=policy.paths.vlm_checkpoint, device="cpu")
    with adapters_disabled(policy.captioner.model):
        reference = _logprobs(policy.captioner, group)
    assert torch.allclose(reference, _logprobs(base, group), atol=1e-6, rtol=0)
    assert not torch.allclose(_logprobs(policy.captioner, group), reference, atol=1e-4)  # training moved it


def test_exports_load_into_the_captioner(trained, group):
    from vans.captioner import load_captioner
    from vans.lora import load_vlm_checkpoint

    _, policy, result = trained
    trained_logp = _logprobs(policy.captioner, group)
    merged = load_captioner(policy.paths.vlm, checkpoint=result.exports["merged"], device="cpu")
    assert merged.checkpoint_report.clean
    assert torch.allclose(_logprobs(merged, group), trained_logp, atol=1e-4)
    stacked = load_captioner(policy.paths.vlm, checkpoint=policy.paths.vlm_checkpoint, device="cpu")
    report = load_vlm_checkpoint(stacked.model, result.exports["adapter"])  # the low-level call: no chain
    assert report.merged_lora == len(policy.lora)
    assert torch.allclose(_logprobs(stacked, group), trained_logp, atol=1e-4)


def test_adapter_export_applies_its_start_checkpoint_or_refuses(trained, group, tmp_path):
    """The adapter is a delta on the VANS vlm.safetensors the run started from: loading it alone on the base
    Qwen folder must give the trained model (start applied from its recorded path), never base + delta."""
    import shutil

    from safetensors import safe_open

    from vans.captioner import load_captioner
    from vans.errors import ModelFileError

    _, policy, result = trained
    assert policy.paths.vlm_checkpoint is not None  # the tiny run starts from the demo vlm.safetensors
    with safe_open(result.exports["adapter"], framework="pt") as f:
        meta = f.metadata()
    assert meta["start_checkpoint"] == policy.paths.vlm_checkpoint.name
    assert meta["start_checkpoint_path"] == str(policy.paths.vlm_checkpoint.resolve())
    trained_logp = _logprobs(policy.captioner, group)
    alone = load_captioner(policy.paths.vlm, checkpoint=result.exports["adapter"], device="cpu")
    assert torch.allclose(_logprobs(alone, group), trained_logp, atol=1e-4)

    # moved somewhere without its start file: refused with the fix, not loaded as base + delta
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    copy = shutil.copy(result.exports["adapter"], lonely / "vlm_lora.safetensors")
    (tmp_path / "gone").mkdir()
    moved = tmp_path / "gone" / policy.paths.vlm_checkpoint.name
    shutil.move(policy.paths.vlm_checkpoint, moved)
    try:
        with pytest.raises(ModelFileError, match="trained on top of vlm.safetensors.*merged export"):
            load_captioner(policy.paths.vlm, checkpoint=copy, device="cpu")
        # the start file beside the adapter is found, but another file under that name is refused
        shutil.copy(moved, lonely / moved.name)
        assert torch.allclose(_logprobs(load_captioner(policy.paths.vlm, checkpoint=copy, device="cpu"), group),
                              trained_logp, atol=1e-4)
        from vans.fixtures.qwen import write_tiny_vans_vlm_checkpoint

        write_tiny_vans_vlm_checkpoint(lonely / moved.name, policy.paths.vlm, seed=5)
        with pytest.raises(ModelFileError, match="fingerprint mismatch"):
            load_captioner(policy.paths.vlm, checkpoint=copy, device="cpu")
    finally:
        shutil.move(moved, policy.paths.vlm_checkpoint)


def test_zero_spread_group_gives_zero_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, stats = grpo_token_loss(logp, logp.detach(), logp.detach(), torch.zeros(4), mask, 0.2, 0.004)
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0 and stats["ratio_mean"] == 1.0
    logp.grad = None
    loss, _ = grpo_token_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1, 0, 0]), mask, 0.2, 0.004)
    loss.backward()
    assert torch.count_nonzero(logp.grad[2:]) == 0 and torch.count_nonzero(logp.grad[:2]) == 10


def test_clip_and_kl_terms():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]])  # ratio e^0.5 on token 0: clipped at 1.2 for a positive advantage
    loss, stats = grpo_token_loss(logp, old, torch.tensor([[0.0, -1.0]]), torch.tensor([1.0]),
                                  torch.ones(1, 2, dtype=torch.bool), 0.2, 0.5)
    assert stats["clip_frac"] == 0.5
    assert stats["kl"] == pytest.approx((torch.exp(torch.tensor(-1.0)) + 1 - 1).item() / 2)
    loss.backward()
    assert logp.grad[0, 0] == 0.0  # the clipped token carries no policy gradient (and no KL: ref = logp there)


def test_policy_step_skips_zero_spread_and_nan_groups(trained, demo_dataset):
    _, policy, _ = trained
    samples = load_samples(demo_dataset).samples[:2]
    original = policy._clip_v
    calls = []

    def clip_v_nan_first(groups, step):
        calls.append(len(groups))
        values = original(groups, step)
        return [values[0] * float("nan"), *values[1:]]

    policy._clip_v = clip_v_nan_first
    try:
        for p in policy.trainable_parameters():
            p.grad = None
        with progress.quiet():
            metrics = policy.step(samples, step=1)
        assert metrics["groups/nan_skipped"] == 1 and metrics["groups/trained"] == 1 and calls == [2]
        assert all(torch.isfinite(p.grad).all() for p in policy.trainable_parameters() if p.grad is not None)
        policy._clip_v = original
        weights = policy.cfg.reward
        saved = (weights.format_weight, weights.rouge_l_weight, weights.clip_v_weight)
        weights.format_weight = weights.rouge_l_weight = weights.clip_v_weight = 0.0  # no preference at all
        for p in policy.trainable_parameters():
            p.grad = None
        with progress.quiet():
            metrics = policy.step(samples, step=1)
        weights.format_weight, weights.rouge_l_weight, weights.clip_v_weight = saved
        assert metrics["groups/zero_spread"] == 2 and metrics["groups/trained"] == 0
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.trainable_parameters())
    finally:
        policy._clip_v = original


def test_out_of_memory_names_the_settings(trained, tmp_path):
    cfg, policy, _ = trained
    original = policy._sample_group

    def oom(sample):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    policy._sample_group = oom
    try:
        cfg2 = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml",
                           [f"data.path={cfg.data.path}", f"run.out_dir={tmp_path}", "run.steps=1"])
        with pytest.raises(InputError, match="rollout.group_size.*render.batch"):
            train(cfg2, policy, policy.runtime)
    finally:
        policy._sample_group = original


def test_resume_equals_uninterrupted(trained, tmp_path, demo_models, demo_dataset):
    _, _, full = trained
    out = tmp_path / "resumed"
    cfg, policy, runtime = make(out, demo_models, demo_dataset, "run.steps=2", "run.save_every=1", "run.stop_at=1")
    assert train(cfg, policy, runtime).last_step == 1
    cfg, policy, runtime = make(out, demo_models, demo_dataset, "run.steps=2", "run.save_every=1", "run.resume=true")
    result = train(cfg, policy, runtime)
    assert result.first_step == 2 and result.finished
    assert strip(read_metrics(out)) == strip(read_metrics(full.out_dir))


# The tiny model writes " even" in ~15 % of random captions: ROUGE-L against "even" is reachable. 32 steps at
# lr 5e-3, G 8, 2 prompts per step, on every run seed of LEARN_SEEDS. The last-4 mean reward minus the first-4 mean
# measured 0.73 0.64 0.84 0.69 0.69 on seeds 0-4 (bound 0.2; over the frozen level: 0.71 0.61 0.91 0.75 0.70), and
# 0.70 0.90 0.82 0.95 0.59 0.80 0.65 0.72 0.77 0.64 on seeds 5-14 (not run here). The earlier 24 steps at lr 3e-2
# gave 0.45 on seed 4 and collapsed on seed 10 (from step 18 both groups at ROUGE-L 0 with no spread, so no signal
# was left: -0.13); 32 steps at lr 2e-3 left seed 9 at 0.08. Token sampling is discrete, so CPU rounding can move a
# trajectory as much as a seed does: hence the room and the out-of-set check. About 30 s wall with the control.
LEARN_SEEDS = (0, 1, 2, 3, 4)


def test_learns_a_reachable_caption_and_frozen_does_not(tmp_path, demo_models):
    data = write_demo_dataset(tmp_path / "data", count=2, captions=["even"])
    common = ("run.steps=32", "run.save_every=32", "rollout.group_size=8", "rollout.max_new_tokens=4",
              "reward.format_weight=0", "reward.clip_v_weight=0", "export.merged=false", "export.adapter=false")

    def curve(name, *extra):
        cfg, policy, runtime = make(tmp_path / name, demo_models, data, *common, *extra)
        start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        train(cfg, policy, runtime)
        rows = read_metrics(tmp_path / name)
        moved = [k for k, v in policy.trainable_state_dict().items() if not torch.equal(v, start[k])]
        return [r["reward/rouge_l"] for r in rows], rows, moved

    # the lr-0 control: gradients flow, no weight moves, and sampling alone does not raise the reward (its two
    # halves of 16 steps, steadier than 4 steps: seed 0 measured 0.072 then 0.109; its first and last 4 steps
    # measured 0.031 and 0.146, noise of 4 x 16 captions)
    frozen, rows, moved = curve("lr0", "optim.lr=0", "run.seed=0")
    assert moved == [] and any(r["grad_norm"] > 0 for r in rows)
    assert sum(frozen[16:]) / 16 < sum(frozen[:16]) / 16 + 0.1, frozen
    level = sum(frozen) / len(frozen)  # the frozen policy's reward level
    margins = []
    for seed in LEARN_SEEDS:
        learned, _, _ = curve(f"seed{seed}", "optim.lr=5e-3", f"run.seed={seed}")
        first, last = sum(learned[:4]) / 4, sum(learned[-4:]) / 4
        margins.append((seed, last - first, last - level))
    assert all(gain > 0.2 and over_frozen > 0.2 for _, gain, over_frozen in margins), margins


def test_cli_kill_9_then_resume(tmp_path, demo_models, demo_dataset):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "trainer.stage1", "--config", str(CONFIGS / "stage1_tiny.yaml"),
           "--set", f"models_dir={demo_models}", "--set", f"data.path={demo_dataset}", "--set", f"run.out_dir={out}",
           "--set", "run.save_every=1", "--set", "export.merged=false", "--set", "reward.clip_v_weight=0"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + ["--set", "run.steps=50"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(out)) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from trainer.checkpoint import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and checkpoint_step(latest) >= len(read_metrics(out)) - 1
    target = checkpoint_step(latest) + 1
    done = subprocess.run(cmd + ["--set", f"run.steps={target}", "--resume"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, target + 1))
    assert (out / "export" / "vlm_lora.safetensors").is_file()


def test_cli_reports_bad_settings_in_one_line(capsys):
    from trainer.stage1 import main

    assert main(["--config", str(CONFIGS / "stage1_tiny.yaml"), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "'optim.lrr'" in err and "optim.lr" in err and len(err.strip().splitlines()) == 1


def test_cli_names_a_missing_dit_file(capsys, tmp_path, demo_models, demo_dataset):
    from trainer.stage1 import main

    args = ["--config", str(CONFIGS / "stage1_tiny.yaml"), "--set", f"models_dir={demo_models}",
            "--set", f"data.path={demo_dataset}", "--set", f"run.out_dir={tmp_path}",
            "--set", f"dit={tmp_path / 'nope.safetensors'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "dit file not found" in err and "nope.safetensors" in err
