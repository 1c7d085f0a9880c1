"""Stage 2's fast modes through the real policy and runner on the tiny random-weight models, CPU: Flow-GRPO-Fast
(``grpo.step_selection=window``, branched), MixGRPO (``sliding``) and DiffusionNFT (``grpo.algorithm=nft``).

Per mode: the first ratio is exactly 1 (flow_grpo modes), a zero-spread group trains nothing, a run killed with
SIGKILL and resumed equals an uninterrupted run, and the brightness reward rises on every seed of ``SEEDS`` while
the lr-0 control stays exactly where it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer import stage2
from trainer.checkpoint import latest_checkpoint
from trainer.config import load_config
from trainer.data import load_samples
from trainer.metrics import read_metrics
from trainer.stage2 import OLD_PREFIX, Stage2Config
from vans.errors import InputError
from test_stage2 import LEARN, _eval_brightness, make, train
from trainer_fixtures import CONFIGS, REPO, demo_dataset, demo_models, tiny_overrides  # noqa: F401

MODES = {
    "window": ("grpo.step_selection=window", "grpo.window=[0.25,1.0]"),  # K = 4: branch at step 1 or 2
    "sliding": ("grpo.step_selection=sliding", "grpo.slide_every=1", "grpo.window_size=2"),
    "nft": ("grpo.algorithm=nft", "grpo.same_noise=false", "grpo.nft_old_ramp=0.2"),  # the old policy lags visibly
}
SEEDS = (0, 1, 2, 3, 4)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "mem/"))} for r in rows]


SLOW = pytest.mark.skipif(not os.environ.get("VANS_SLOW_TRAINING"), reason=(
    "slow proofs of the fast modes (kill -9 resume per mode, learning on 5 seeds: ~3.5 min on 2 cores): set "
    "VANS_SLOW_TRAINING=1 (.ci/run does)"))


def test_settings_are_checked_with_one_line_naming_the_key():
    def check(*overrides):
        load_config(Stage2Config, None, list(overrides)).validate()

    with pytest.raises(InputError, match="grpo.train_guidance=none with video.guidance=5.0.*video.guidance=1"):
        check("grpo.train_guidance=none")  # flow_grpo must train the rollout's velocity
    check("grpo.train_guidance=none", "video.guidance=1")  # CFG-free flow_grpo: guidance 1 in rollout and training
    check("grpo.algorithm=nft", "grpo.train_guidance=none")  # nft: guided rollouts, conditional training
    check("grpo.algorithm=nft", "grpo.noise_level=0")  # nft samples with the ODE
    for overrides, match in ((("grpo.algorithm=ppo",), "grpo.algorithm"),
                             (("grpo.train_guidance=cfg",), "grpo.train_guidance"),
                             (("grpo.algorithm=nft", "grpo.same_noise=true"), "same_noise"),
                             (("grpo.algorithm=nft", "grpo.nft_beta=0"), "nft_beta"),
                             (("grpo.algorithm=nft", "grpo.nft_timestep_range=[0.5,0.2]"), "grpo.nft_timestep_range"),
                             (("grpo.algorithm=nft", "grpo.nft_old_decay_max=1"), "nft_old_decay_max"),
                             (("grpo.step_selection=sliding", "grpo.slide_every=0"), "grpo.slide_every"),
                             (("grpo.step_selection=window", "grpo.window=[0.6,0.2]"), "grpo.window")):
        with pytest.raises(InputError, match=match):
            check(*overrides)
    cfg = load_config(Stage2Config, None, ["grpo.step_selection=sliding"])
    assert cfg.grpo.sizes() == 4 and len(cfg.plan(0).train_steps) == 4  # MixGRPO's window by default
    cfg = load_config(Stage2Config, None, ["grpo.step_selection=window"])
    assert cfg.grpo.sizes() == 2 and cfg.plan(0, torch.Generator().manual_seed(0)).branch_at is not None
    for name in ("stage2_fast.yaml", "stage2_nft.yaml"):
        load_config(Stage2Config, CONFIGS / name).validate()


@pytest.mark.parametrize("mode", ["window", "sliding"])
def test_branched_rollout_shares_the_prefix_and_the_first_ratio_is_exactly_one(tmp_path, demo_models, demo_dataset,
                                                                               mode):
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, *MODES[mode],
                                "grpo.group_size=4", "run.steps=2", "grpo.same_noise=false")
    sample = load_samples(demo_dataset).samples[0]
    prompt = policy._prepare(sample, 0, stage2._Timer(policy.device))
    plan = cfg.plan(1, torch.Generator().manual_seed(0))
    assert plan.branch_at == plan.train_steps[0] >= 1  # an ODE prefix exists (same_noise=false is irrelevant)
    rollout, _ = policy._rollout(prompt, plan, seed=7)
    first = rollout.states[plan.branch_at]
    assert all(torch.equal(first[i], first[0]) for i in range(4))  # one trajectory up to the branch
    assert len({tuple(x.flatten().tolist()) for x in rollout.latents}) == 4  # G different videos after it
    train(cfg, policy, runtime)
    rows = read_metrics(cfg.run.out_dir)
    for row in rows:
        assert row["ratio_min"] == row["ratio_max"] == 1.0 and row["logprob_diff_max"] == 0.0
        assert row["count/trained_steps"] == 2 and row["grad_norm"] > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_zero_spread_group_trains_nothing(tmp_path, demo_models, demo_dataset, mode):
    cfg, policy, _ = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, *MODES[mode], "grpo.group_size=4")
    policy._reward = lambda videos, prompt: {"reward": torch.full((videos.shape[0],), 0.5), "skipped": False}
    metrics = policy.step(load_samples(demo_dataset).samples[:1], 1)
    assert metrics["count/zero_spread_groups"] == 1 and metrics["count/trained_steps"] == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.trainable_parameters())


def test_nft_step_logs_its_loss_and_keeps_the_old_policy_with_the_checkpoint(tmp_path, demo_models, demo_dataset):
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, *MODES["nft"],
                                "grpo.group_size=4", "run.steps=3", "run.save_every=1")
    result = train(cfg, policy, runtime)
    rows = read_metrics(cfg.run.out_dir)
    assert [r["nft/old_decay_mean"] for r in rows] == pytest.approx([0.0, 0.2, 0.4])
    assert all(r["count/trained_steps"] == cfg.grpo.nft_timesteps and r["nft/loss_mean"] > 0 for r in rows)
    assert rows[0]["nft/old_deviate_mean"] == 0.0 < rows[-1]["nft/old_deviate_mean"]  # old lags after updates
    assert "ratio_mean" not in rows[0]
    state = policy.trainable_state_dict()
    old = {k for k in state if k.startswith(OLD_PREFIX)}
    assert old and len(old) == len(state) // 2
    from safetensors import safe_open

    with safe_open(str(result.exports["lora"]), "pt") as f:  # the export holds the trained adapters only
        assert not any("nft_old" in k for k in f.keys())


def _uninterrupted(tmp_path, demo_models, demo_dataset, quick):
    whole = make(tmp_path / "whole", demo_models, demo_dataset, *quick)
    train(*whole)
    return whole


@SLOW
@pytest.mark.parametrize("mode", list(MODES))
def test_resume_after_kill_9_equals_the_uninterrupted_run(tmp_path, demo_models, demo_dataset, mode):
    quick = (*LEARN, *MODES[mode], "grpo.group_size=4", "run.steps=4", "run.save_every=1", "optim.lr=2e-3",
             "run.tensorboard=false")
    whole = _uninterrupted(tmp_path, demo_models, demo_dataset, quick)
    out = tmp_path / "killed"
    args = sum((["--set", o] for o in tiny_overrides(out, demo_models, demo_dataset, *quick, "run.steps=400")), [])
    proc = subprocess.Popen([sys.executable, "-m", "trainer.stage2", "--config", str(CONFIGS / "stage2_tiny.yaml"),
                             *args], cwd=REPO,  # the same intra-op threads as the in-process run: same rounding
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads())),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and proc.returncode == -signal.SIGKILL
    second = make(out, demo_models, demo_dataset, *quick)
    second[0].run.resume = True
    assert train(*second).finished
    assert second[1]._old is None if mode != "nft" else second[1]._old is not None
    assert _strip(read_metrics(out)) == _strip(read_metrics(tmp_path / "whole"))
    resumed, uninterrupted = second[1].trainable_state_dict(), whole[1].trainable_state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():  # nft: the old policy (nft_old.*) included
        assert torch.equal(v, resumed[k]), k


# -- learning proofs: every seed of SEEDS, lr-0 control flat --------------------------------------------------------

# One prompt per step, lr 6e-3, 16 steps; window G = 16, sliding and nft G = 8. Measured margins (gain / initial
# spread; bound 1.0) on SEEDS 0-4, and on seeds 5-9 (not run here) as a check that the room is not luck:
#   window   4.82 4.77 4.02 4.01 4.57  (5-9: 3.22 3.81 4.75 4.81 4.16)
#   sliding  2.16 3.28 3.45 3.08 3.19  (5-9: 2.37 3.09 1.81 1.78 3.28)
#   nft      2.24 2.76 2.42 5.30 3.09  (5-9: 2.96 2.06 2.51 2.27 2.52)
# With 8 steps at G = 16, window measured 2.34 2.70 1.41 -0.19 2.92. Seed 3 also failed with the branch step fixed
# (windows [0, 1], [1, 2], [2, 3]: 0.13, 0.14, -0.67), and with 16 steps at G = 8 seed 1 fell to -0.99, while G = 32
# at 8 steps gave 3.20 or more on all five: sampling noise of the gradient, not a wrong one. Measured against the
# pathwise gradient of the same expected reward (differentiated through the reparameterised window steps, 256 rows),
# the branched policy gradient has cosine ~0.7 at G = 256 for either branch step, but only ~0.14-0.21 on average per
# G = 16 iteration (some negative): a proof needs enough rollouts (G·steps = 256 here). sliding and nft at 12 steps
# fell to 1.14 and 1.51 on seeds 5-9. Wall seconds for 5 seeds on 2 threads: window ~73, nft ~57, sliding ~40.
LEARN_RUN = {
    "window": ("optim.lr=6e-3", "run.steps=16", "grpo.group_size=16"),
    "sliding": ("optim.lr=6e-3", "run.steps=16", "grpo.group_size=8"),
    "nft": ("optim.lr=6e-3", "run.steps=16", "grpo.group_size=8"),
}


def _learn(tmp_path, models, data, mode, seed, *extra, name="learn"):
    cfg, policy, runtime = make(tmp_path / f"{name}_{mode}_{seed}", models, data, *LEARN, *MODES[mode], f"run.seed={seed}",
                                *extra)
    samples = load_samples(data).samples
    before = _eval_brightness(policy, samples[:2])
    start = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    train(cfg, policy, runtime, samples)
    rows = read_metrics(cfg.run.out_dir)
    return before, _eval_brightness(policy, samples[:2]), rows, policy, start


@SLOW
@pytest.mark.parametrize("mode", list(MODES))
def test_each_fast_mode_raises_the_reward_on_every_seed(tmp_path, demo_models, demo_dataset, mode):
    margins = []
    for seed in SEEDS:
        before, after, rows, _, _ = _learn(tmp_path, demo_models, demo_dataset, mode, seed, *LEARN_RUN[mode])
        spread = rows[0]["reward/brightness_std"]  # how much the G rollouts of one prompt differ at the start
        margins.append((seed, (after - before) / spread))
    assert all(m > 1.0 for _, m in margins), margins
    # the lr-0 control: gradients flow, nothing moves, the evaluation is exactly the same
    before, after, rows, policy, start = _learn(tmp_path, demo_models, demo_dataset, mode, 0, "optim.lr=0",
                                                "run.steps=2", name="control")
    assert after == before and all(r["grad_norm"] > 0 for r in rows)
    assert all(torch.equal(v, start[k]) for k, v in policy.trainable_state_dict().items()
               if not k.startswith(OLD_PREFIX))  # nft's old policy: d·x + (1 − d)·x may round in the last bit
