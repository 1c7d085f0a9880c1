"""Flow-GRPO pieces (trainer/flow_grpo.py): step plans, the clipped loss, recomputed log-probs on the tiny DiT."""

from __future__ import annotations

import pytest
import torch

from trainer import dit_lora, flow_grpo
from vans.errors import InputError
from vans.fixtures.wan import tiny_wan_dit
from vans.generator import VideoGenerator
from vans.lora import lora_modules
from vans.sampling import gaussian_step_kl, sample_flow

TEXT_DIM = 32
STEPS, SHIFT, NOISE_LEVEL, G = 4, 5.0, 0.7, 4


# -- step plans --------------------------------------------------------------------------------

def test_all_and_fraction_plans():
    # Flow-GRPO trains int(K · 0.99) steps: never the final σ → 0 transition
    assert flow_grpo.plan_steps(5, "all") == flow_grpo.StepPlan(None, [0, 1, 2, 3])
    assert flow_grpo.plan_steps(10, "all").train_steps == list(range(int(10 * 0.99)))
    assert flow_grpo.plan_steps(1, "all").train_steps == [0]
    g = torch.Generator().manual_seed(0)
    draws = [flow_grpo.plan_steps(10, "fraction", fraction=0.3, generator=g) for _ in range(20)]
    assert all(p.sde_steps is None and len(p.train_steps) == 3 and p.train_steps == sorted(set(p.train_steps))
               for p in draws)
    assert len({tuple(p.train_steps) for p in draws}) > 1  # random subsets, not a fixed one


def test_window_plan_stays_in_the_high_noise_range():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        plan = flow_grpo.plan_steps(20, "window", window=(0.0, 0.5), window_size=2, generator=g)
        assert plan.sde_steps == plan.train_steps and len(plan.train_steps) == 2
        assert plan.train_steps[1] == plan.train_steps[0] + 1 and 0 <= plan.train_steps[0] and plan.train_steps[1] < 10
        starts.add(plan.train_steps[0])
    assert len(starts) > 3


@pytest.mark.parametrize("kwargs, match", [
    ({"selection": "best"}, "step selection"), ({"selection": "fraction", "fraction": 0.0}, "train_fraction"),
    ({"selection": "window", "window": (0.6, 0.2)}, "window"),
])
def test_bad_plans_are_named(kwargs, match):
    with pytest.raises(InputError, match=match):
        flow_grpo.plan_steps(10, **kwargs)


# -- loss ----------------------------------------------------------------------------------------

def test_advantages_zero_for_a_group_without_spread_and_clipped():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 10.0])
    adv = flow_grpo.advantages(rewards, 4, adv_clip=1.5)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[4:].abs().max() == 1.5 and adv[7] == 1.5
    assert flow_grpo.zero_spread_groups(rewards, 4).tolist() == [True, False]


def test_clip_stops_the_gradient_outside_the_trust_region():
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    old = torch.tensor([0.0, -0.01, 0.01, -0.01])  # ratio 1, e^0.01 (> 1+ε), e^-0.01, e^0.01
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, ratio, clipped = flow_grpo.clipped_policy_loss(logp, old, adv, clip_range=1e-3)
    loss.sum().backward()
    assert clipped.tolist() == [False, True, True, True]
    # sample 1: A > 0 and r above 1+ε -> clipped, no gradient; sample 2: A > 0, r below 1-ε -> gradient kept
    # sample 3: A < 0, r above 1+ε -> gradient kept (pessimistic bound)
    assert logp.grad[0] == -1.0 and logp.grad[1] == 0.0
    assert logp.grad[2] == pytest.approx(-ratio[2].item()) and logp.grad[3] == pytest.approx(ratio[3].item())


def test_loss_adds_beta_times_the_gaussian_step_kl():
    mean = torch.randn(3, 2, 4)
    ref = mean + 0.1
    std = torch.tensor(0.5)
    zero = torch.zeros(3)
    loss, stats = flow_grpo.flow_grpo_loss(zero, zero, zero, clip_range=1e-3, beta=0.004, mean=mean,
                                           ref_mean=ref, std=std)
    assert loss.item() == pytest.approx(0.004 * (0.01 / (2 * 0.25)), rel=1e-5)
    torch.testing.assert_close(stats["kl"], gaussian_step_kl(mean, ref, std))
    with pytest.raises(InputError, match="reference"):
        flow_grpo.flow_grpo_loss(zero, zero, zero, clip_range=1e-3, beta=0.1)


# -- recomputation on the real model call --------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    dit = tiny_wan_dit(text_dim=TEXT_DIM).float()
    dit_lora.prepare_dit(dit, "lora", rank=4, alpha=8.0)
    gen = VideoGenerator(dit, None, None)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond = torch.randn(1, 5, TEXT_DIM, generator=g)
    uncond = torch.randn(1, 5, TEXT_DIM, generator=g)
    velocity = gen.guided_velocity(context, cond, uncond, 5.0)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g).expand(G, -1, -1, -1, -1).contiguous()
    rollout = sample_flow(velocity, noise, num_steps=STEPS, shift=SHIFT, noise_level=NOISE_LEVEL,
                          keep_steps=range(STEPS), generator=torch.Generator().manual_seed(1))
    return dit, gen, velocity, rollout


def _train(setup, adv, steps=(0, 1, 2, 3), beta=0.004, micro_batch=0):
    dit, gen, velocity, rollout = setup
    dit.zero_grad(set_to_none=True)
    return flow_grpo.train_on_rollout(
        velocity, rollout, list(steps), adv, noise_level=NOISE_LEVEL, cap=flow_grpo.sigma_cap(STEPS, SHIFT),
        model_dtype=torch.float32, clip_range=1e-3, beta=beta,
        reference=lambda: dit_lora.reference_policy(gen, "lora"), loss_scale=1.0 / len(steps),
        micro_batch=micro_batch)


def test_first_on_policy_ratio_is_exactly_one(setup):
    dit = setup[0]
    stats = _train(setup, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert len(stats["ratio"]) == STEPS * G
    assert max(stats["logprob_diff"]) == 0.0  # recomputed log-prob == rollout log-prob, bit for bit
    assert all(r == 1.0 for r in stats["ratio"]) and sum(stats["clipped"]) == 0
    grads = [m.lora_B.weight.grad for m in lora_modules(dit).values()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # same-noise rollouts still branch: the SDE draws differ per row
    assert not torch.equal(setup[3].latents[0], setup[3].latents[1])


def test_zero_advantage_group_gives_zero_gradient(setup):
    dit = setup[0]
    _train(setup, torch.zeros(G))
    assert all(m.lora_B.weight.grad is None or torch.count_nonzero(m.lora_B.weight.grad) == 0
               for m in lora_modules(dit).values())


def test_a_step_along_the_gradient_raises_the_logprob_of_preferred_samples(setup):
    dit, _, velocity, rollout = setup
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _train(setup, adv, steps=(1,), beta=0.0)
    params = [p for p in dit.parameters() if p.requires_grad]
    before = flow_grpo.step_logprob(velocity, rollout.states[1], rollout.next_states[1], rollout.sigmas[1],
                                    rollout.sigmas[2], noise_level=NOISE_LEVEL, cap=flow_grpo.sigma_cap(STEPS, SHIFT),
                                    model_dtype=torch.float32)[0].detach()
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-2)
        after = flow_grpo.step_logprob(velocity, rollout.states[1], rollout.next_states[1], rollout.sigmas[1],
                                       rollout.sigmas[2], noise_level=NOISE_LEVEL,
                                       cap=flow_grpo.sigma_cap(STEPS, SHIFT), model_dtype=torch.float32)[0]
        for p, s in zip(params, saved):
            p.copy_(s)
    change = after - before
    assert (change * adv).sum() > 0  # preferred rows gained log-prob relative to the others


def test_micro_batches_accumulate_the_same_gradient(setup):
    dit = setup[0]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _train(setup, adv, steps=(0, 2))
    whole = [m.lora_B.weight.grad.clone() for m in lora_modules(dit).values()]
    _train(setup, adv, steps=(0, 2), micro_batch=2)
    for a, m in zip(whole, lora_modules(dit).values()):
        torch.testing.assert_close(m.lora_B.weight.grad, a, rtol=1e-4, atol=1e-8)


def test_a_step_that_was_not_stored_is_refused(setup):
    with pytest.raises(InputError, match="keep_steps"):
        flow_grpo.train_on_rollout(setup[2], setup[3], [7], torch.zeros(G), noise_level=NOISE_LEVEL, cap=0.5,
                                   model_dtype=torch.float32, clip_range=1e-3, beta=0.0)
