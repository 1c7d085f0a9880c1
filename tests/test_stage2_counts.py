"""The stage-2 FLOP model (``vans.flops.stage2_rows``) counts the DiT forwards the policy makes: one real step per
mode on the tiny models (CPU), the generator's counters (``count/dit_rollout_rows``, ``count/dit_train_rows``)
against the model's rollout rows and its training forwards (backward and recompute are not forwards through the
engine's model call, so they are set to 0 here). The projected seconds per mode rest on these counts."""

import pytest
import torch

from trainer import stage2
from trainer.data import load_samples
from trainer.metrics import read_metrics
from vans.flops import stage2_rows
from test_stage2 import LEARN, make, train
from trainer_fixtures import demo_dataset, demo_models  # noqa: F401

G, K = 4, 6
MODES = {  # name: (overrides, expected stage2_rows keywords apart from the plan's)
    "default, CFG": (("video.guidance=5.0",), dict(rollout_cfg=True, train_cfg=True, no_grad_forwards=1)),
    "default, guidance 1, no KL": (("grpo.beta=0",), dict(rollout_cfg=False, train_cfg=False, no_grad_forwards=0)),
    "window, CFG": (("video.guidance=5.0", "grpo.step_selection=window", "grpo.window_size=2",
                     "grpo.window=[0.5,1.0]"), dict(rollout_cfg=True, train_cfg=True, no_grad_forwards=1)),
    "sliding": (("grpo.step_selection=sliding", "grpo.window_size=3"),
                dict(rollout_cfg=False, train_cfg=False, no_grad_forwards=1)),
    "nft, guidance 1": (("grpo.algorithm=nft", "grpo.same_noise=false", "grpo.nft_timesteps=3"),
                        dict(rollout_cfg=False, train_cfg=False, no_grad_forwards=1)),  # the old policy
    "nft, CFG rollout, conditional training": (
        ("grpo.algorithm=nft", "grpo.same_noise=false", "grpo.nft_timesteps=3", "video.guidance=5.0",
         "grpo.train_guidance=none"), dict(rollout_cfg=True, train_cfg=False, no_grad_forwards=1)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_measured_dit_rows_equal_the_flop_model(tmp_path, demo_models, demo_dataset, mode):
    overrides, expected = MODES[mode]
    cfg, policy, runtime = make(tmp_path / "run", demo_models, demo_dataset, *LEARN, f"grpo.group_size={G}",
                                f"video.steps={K}", "run.steps=1", "optim.lr=1e-3", *overrides)
    train(cfg, policy, runtime, load_samples(demo_dataset).samples)
    row = read_metrics(cfg.run.out_dir)[0]
    assert row["count/groups"] == 1 and row["count/zero_spread_groups"] == 0
    trained = row["count/trained_steps"]
    if cfg.grpo.algorithm == "nft":
        prefix = 0
        assert trained == 3
    else:  # the group's plan as the policy draws it (step 1, rank 0, sample 0), branch point included
        plan = cfg.plan(0, torch.Generator().manual_seed(stage2._seed(cfg.run.seed, 1, 0, 0)))
        prefix = plan.branch_at or 0
        assert trained == len(plan.train_steps)
        if cfg.grpo.step_selection == "window":
            assert prefix > 0  # a real shared prefix: the branched rollout is cheaper than G full ones
    model = stage2_rows(group_size=G, steps=K, trained_steps=trained, prefix_steps=prefix, backward=0,
                        checkpointing=False, **expected)
    assert row["count/dit_rollout_rows"] == model["rollout"]
    assert row["count/dit_train_rows"] == model["train"]
    assert row["count/dit_calls"] > 0
