"""Stage-2 fast modes at the engine level: the branched rollout (Flow-GRPO-Fast), the sliding window (MixGRPO),
DiffusionNFT's loss and training pass, and the FLOP model of one iteration per mode (vans.bench)."""

from __future__ import annotations

import pytest
import torch

from trainer import dit_lora, flow_grpo, nft
from vans.errors import InputError
from vans.fixtures.wan import tiny_wan_dit
from vans.generator import VideoGenerator
from vans.lora import lora_modules
from vans.sampling import flow_sigmas, sample_flow

TEXT_DIM = 32
STEPS, SHIFT, NOISE_LEVEL, G = 4, 5.0, 0.7, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    dit = tiny_wan_dit(text_dim=TEXT_DIM).float()
    dit_lora.prepare_dit(dit, "lora", rank=4, alpha=8.0)
    with torch.no_grad():  # non-zero adapters: the old-policy swap below must change the prediction
        for m in lora_modules(dit).values():
            m.lora_B.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    gen = VideoGenerator(dit, None, None)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond = torch.randn(1, 5, TEXT_DIM, generator=g)
    uncond = torch.randn(1, 5, TEXT_DIM, generator=g)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    guided, conditional = gen.guided_velocity(context, cond, uncond, 5.0), gen.guided_velocity(context, cond, None, 1.0)
    return dit, gen, guided, conditional, noise


def _counting(velocity, batches):
    def wrapped(x, sigma):
        batches.append(x.shape[0])
        return velocity(x, sigma)
    return wrapped


# -- 1. branched rollout ------------------------------------------------------------------------------------------

def test_branched_rollout_shares_the_prefix_and_branches_in_the_window(model):
    _, _, velocity, _, noise = model
    plan = flow_grpo.StepPlan([2], [2], branch_at=2)
    batches = []
    out = sample_flow(_counting(velocity, batches), noise, num_steps=STEPS, shift=SHIFT, noise_level=NOISE_LEVEL,
                      sde_steps=plan.sde_steps, keep_steps=plan.train_steps, generator=torch.Generator().manual_seed(1),
                      branch_at=plan.branch_at, branch_size=G)
    assert batches == [1, 1] + [G] * (STEPS - 2)  # the prefix runs on one row per step
    first = out.states[2]
    assert first.shape[0] == G and all(torch.equal(first[i], first[0]) for i in range(G))
    assert not torch.equal(out.next_states[2][0], out.next_states[2][1])  # the window's SDE draws differ per row
    assert not torch.equal(out.latents[0], out.latents[1])
    assert sorted(out.logprobs) == [2] and out.logprobs[2].shape == (G,)


def test_branch_at_zero_equals_the_same_noise_rollout_bit_for_bit(model):
    _, _, _, velocity, noise = model
    kwargs = dict(num_steps=STEPS, shift=SHIFT, noise_level=NOISE_LEVEL, keep_steps=range(STEPS))
    branched = sample_flow(velocity, noise, branch_at=0, branch_size=G, generator=torch.Generator().manual_seed(1),
                           **kwargs)
    same = sample_flow(velocity, noise.expand(G, -1, -1, -1, -1).contiguous(),
                       generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(branched.latents, same.latents)
    assert all(torch.equal(branched.logprobs[i], same.logprobs[i]) for i in range(STEPS))


def test_branched_rollout_at_noise_zero_is_the_ode(model):
    _, _, velocity, _, noise = model
    ode = sample_flow(velocity, noise, num_steps=STEPS, shift=SHIFT).latents
    branched = sample_flow(velocity, noise, num_steps=STEPS, shift=SHIFT, noise_level=0.0, sde_steps=[1, 2],
                           branch_at=1, branch_size=G, generator=torch.Generator().manual_seed(1)).latents
    # the DiT runs batch 1 before the branch in both, after it batch G vs 1: CPU matmul blocking differs in the
    # last bits (measured up to ~1.5e-5 on latents of order 1 after CFG 5), so compared at fp32-rounding tolerance
    for i in range(G):
        torch.testing.assert_close(branched[i:i + 1], ode, rtol=1e-4, atol=5e-5)

    # a row-wise velocity field (no batch-size numerics): equal bit for bit
    def field(x, sigma):  # separate IEEE multiplies and adds: exact whatever the batch
        return x * x * 0.3 - x * (1 + sigma)

    ode = sample_flow(field, noise, num_steps=STEPS, shift=SHIFT).latents
    branched = sample_flow(field, noise, num_steps=STEPS, shift=SHIFT, noise_level=0.0, branch_at=2,
                           branch_size=G).latents
    assert torch.equal(branched, ode.expand(G, -1, -1, -1, -1))


def test_branching_refuses_bad_arguments(model):
    _, _, velocity, _, noise = model
    with pytest.raises(InputError, match="branch_at"):
        sample_flow(velocity, noise, num_steps=STEPS, branch_at=STEPS, branch_size=G)
    with pytest.raises(InputError, match="keep_steps"):
        sample_flow(velocity, noise, num_steps=STEPS, keep_steps=[1, 3], branch_at=2, branch_size=G)


@pytest.mark.parametrize("selection", ["window", "sliding"])
def test_first_ratio_is_exactly_one_on_a_branched_rollout(model, selection):
    dit, gen, _, velocity, noise = model
    plan = flow_grpo.plan_steps(STEPS, selection, window=(0.25, 1.0), window_size=2, step=10, slide_every=10,
                                generator=torch.Generator().manual_seed(5))
    assert plan.branch_at == plan.train_steps[0] >= 1 and plan.sde_steps == plan.train_steps
    rollout = sample_flow(velocity, noise, num_steps=STEPS, shift=SHIFT, noise_level=NOISE_LEVEL,
                          sde_steps=plan.sde_steps, keep_steps=plan.train_steps, branch_at=plan.branch_at,
                          branch_size=G, generator=torch.Generator().manual_seed(2))
    dit.zero_grad(set_to_none=True)
    stats = flow_grpo.train_on_rollout(
        velocity, rollout, plan.train_steps, torch.tensor([1.0, -1.0, 0.5]), noise_level=NOISE_LEVEL,
        cap=flow_grpo.sigma_cap(STEPS, SHIFT), model_dtype=torch.float32, clip_range=1e-3, beta=0.004,
        reference=lambda: dit_lora.reference_policy(gen, "lora"), loss_scale=1.0 / len(plan.train_steps))
    assert len(stats["ratio"]) == G * len(plan.train_steps)
    assert max(stats["logprob_diff"]) == 0.0 and all(r == 1.0 for r in stats["ratio"])
    assert sum(m.lora_B.weight.grad.abs().sum() for m in lora_modules(dit).values()) > 0


# -- 2. sliding window (MixGRPO) -------------------------------------------------------------------------------

def _mixgrpo_starts(iterations: int, every: int, stride: int, max_timesteps: int) -> list[int]:
    """MixGRPO's progressive schedule run as its stateful procedure: read the window, then count the iteration;
    every ``every`` iterations the start moves by ``stride``; past ``max_timesteps`` it rolls back to 0."""
    cur, in_group, starts = 0, 0, []
    for _ in range(iterations):
        starts.append(cur)
        in_group += 1
        if in_group >= every:
            in_group = 0
            cur += stride
        if cur > max_timesteps:
            cur, in_group = 0, 0
    return starts


@pytest.mark.parametrize("num_steps, every, stride, size", [(20, 25, 1, 4), (10, 3, 2, 3), (6, 2, 5, 2), (2, 1, 1, 4)])
def test_sliding_window_follows_the_mixgrpo_schedule(num_steps, every, stride, size):
    n_iter = 3 * every * (num_steps - 1)
    expected = _mixgrpo_starts(n_iter, every, stride, max(0, num_steps - 2))
    for n, start in enumerate(expected):
        plan = flow_grpo.plan_steps(num_steps, "sliding", window_size=size, step=n, slide_every=every,
                                    slide_stride=stride)
        assert plan.branch_at == start
        length = min(size, max(1, num_steps - 1 - start))  # cut before the last step, at least one step
        assert plan.train_steps == plan.sde_steps == list(range(start, start + length))
        assert plan.train_steps and plan.train_steps[-1] <= max(0, num_steps - 2)  # never the final σ → 0 step
    assert len(set(expected)) == max(0, num_steps - 2) // stride + 1  # it visits every position and rolls back
    assert expected.count(0) > every  # rolled back at least once


def test_sliding_with_stride_zero_stays_put_and_ignores_the_generator():
    plans = {tuple(flow_grpo.plan_steps(20, "sliding", window_size=4, step=n, slide_stride=0,
                                        generator=torch.Generator().manual_seed(n)).train_steps) for n in range(200)}
    assert plans == {(0, 1, 2, 3)}
    with pytest.raises(InputError, match="slide_every"):
        flow_grpo.plan_steps(20, "sliding", slide_every=0)


# -- 3. DiffusionNFT --------------------------------------------------------------------------------------------

def test_nft_weight():
    r = nft.nft_weight(torch.tensor([2.5, -7.0, 0.0, 5.0, -2.5]), 5.0)
    assert r.tolist() == [0.75, 0.0, 0.5, 1.0, 0.25]


def _hand_case(v, v_old):
    # β 0.1, A_max 5, A 2.5 (r 0.75), σ 0.5, D 2, x0 (0, 0), ε (1, −1): x_σ = (0.5, −0.5)
    v = torch.tensor([v], requires_grad=True)
    loss, stats = nft.nft_loss(v, torch.tensor([v_old]), torch.zeros(1, 2), torch.tensor([[0.5, -0.5]]), 0.5,
                               nft.nft_weight(torch.tensor([2.5]), 5.0), beta=0.1, adv_clip=5.0)
    loss.backward()
    return loss.item(), v.grad[0].tolist(), stats


def test_nft_loss_matches_the_hand_computation():
    # on-policy v = v_old = (0.6, −0.2): x̂0± = (0.5 − 0.3, −0.5 + 0.1) = (0.2, −0.4); w = (0.2 + 0.4)/2 = 0.3;
    # ⟨e²⟩ = (0.04 + 0.16)/2 = 0.1; ℓ = (0.75 + 0.25)·(0.1/0.3)/0.1 = 10/3; L = 5·10/3 = 16.6667.
    # dL/dv_j = A_max·2σ·e_j·(1 − 2r)/(D·w) = 5·1·e_j·(−0.5)/0.6 = −(25/6)·e_j = (−0.83333, 1.66667)
    loss, grad, stats = _hand_case([0.6, -0.2], [0.6, -0.2])
    assert loss == pytest.approx(50 / 3, rel=1e-6)
    assert grad == pytest.approx([-0.2 * 25 / 6, 0.4 * 25 / 6], rel=1e-5)
    assert stats["old_deviate"].item() == 0.0 and stats["r"].item() == 0.75
    # off-policy v = (0.8, −0.2), v_old = (0.6, −0.2): v⁺ = 0.1·0.8 + 0.9·0.6 = 0.62, v⁻ = 1.1·0.6 − 0.1·0.8 = 0.58;
    # x̂0⁺ = (0.19, −0.4): w⁺ = 0.295, ⟨e²⟩ = (0.0361 + 0.16)/2 = 0.09805; x̂0⁻ = (0.21, −0.4): w⁻ = 0.305,
    # ⟨e²⟩ = 0.10205; L = 5·(0.75·0.09805/0.295 + 0.25·0.10205/0.305)/0.1 = 16.6464;
    # dL/dv_j = A_max·σ·(2/D)·(−r·e⁺_j/w⁺ + (1 − r)·e⁻_j/w⁻) = 2.5·(−0.75·e⁺_j/0.295 + 0.25·e⁻_j/0.305)
    loss, grad, stats = _hand_case([0.8, -0.2], [0.6, -0.2])
    assert loss == pytest.approx(5 * (0.75 * 0.09805 / 0.295 + 0.25 * 0.10205 / 0.305) / 0.1, rel=1e-6)
    assert loss == pytest.approx(16.6464, abs=1e-4)
    assert grad == pytest.approx([2.5 * (-0.75 * 0.19 / 0.295 + 0.25 * 0.21 / 0.305),
                                  2.5 * (0.75 * 0.4 / 0.295 - 0.25 * 0.4 / 0.305)], rel=1e-5)
    assert grad == pytest.approx([-0.777299, 1.722701], abs=1e-5)
    assert stats["old_deviate"].item() == pytest.approx(0.02, rel=1e-5)


def test_nft_zero_advantage_at_the_old_policy_has_exactly_zero_gradient():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    x_t = 0.3 * x0 + 0.7 * eps
    v = torch.randn(3, 4, 2, 3, 3, generator=g, requires_grad=True)
    loss, _ = nft.nft_loss(v, v.detach(), x0, x_t, 0.7, nft.nft_weight(torch.zeros(3), 5.0), beta=0.1, adv_clip=5.0)
    loss.backward()
    assert loss.item() > 0 and torch.count_nonzero(v.grad) == 0
    v.grad = None  # away from v_old, A = 0 pulls back toward v_old: a non-zero gradient
    loss, _ = nft.nft_loss(v, v.detach() + 0.1, x0, x_t, 0.7, nft.nft_weight(torch.zeros(3), 5.0), beta=0.1,
                           adv_clip=5.0)
    loss.backward()
    assert torch.count_nonzero(v.grad) > 0


def test_nft_timesteps_are_stratified_inside_the_range():
    sigmas = flow_sigmas(20, 5.0)[:-1]
    draws = [nft.nft_timesteps(20, 5.0, 4, (0.0, 0.9), generator=torch.Generator().manual_seed(s)) for s in range(40)]
    n = int(((sigmas >= 0.1) & (sigmas <= 1.0)).sum())
    index = {float(s): i for i, s in enumerate(sigmas)}
    for d in draws:
        picks = [index[float(s)] for s in d]  # schedule values, exactly
        bounds = [k * n // 4 for k in range(5)]
        assert all(bounds[k] <= p < bounds[k + 1] for k, p in enumerate(picks))  # one per stratum, high noise first
    assert len({tuple(d.tolist()) for d in draws}) > 5
    mid = nft.nft_timesteps(20, 5.0, 3, (0.3, 0.6), generator=torch.Generator().manual_seed(0))
    assert ((mid >= 0.4 - 1e-6) & (mid <= 0.7 + 1e-6)).all()
    assert torch.equal(nft.nft_timesteps(6, 5.0, 10, (0.0, 1.0)), flow_sigmas(6, 5.0)[:-1])
    with pytest.raises(InputError, match="nft_timestep_range"):
        nft.nft_timesteps(20, 5.0, 4, (0.5, 0.2))


def _train_nft(model, adv, **kwargs):
    dit, _, _, velocity, _ = model
    x0 = torch.randn(G, 16, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    dit.zero_grad(set_to_none=True)
    sigmas = nft.nft_timesteps(STEPS, SHIFT, 2, generator=torch.Generator().manual_seed(0))
    stats = nft.train_nft(velocity, x0, adv, sigmas, beta=0.1, adv_clip=5.0, model_dtype=torch.float32,
                          generator=torch.Generator().manual_seed(9), loss_scale=0.5, **kwargs)
    return stats, [m.lora_B.weight.grad for m in lora_modules(dit).values()], x0, sigmas


def test_train_nft_zero_spread_group_gives_zero_gradient(model):
    stats, grads, _, _ = _train_nft(model, torch.zeros(G))
    assert len(stats["loss"]) == 2 * G and all(r == 0.5 for r in stats["r"])
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_train_nft_micro_batches_accumulate_the_same_gradient(model):
    adv = torch.tensor([1.0, -1.0, 0.5])
    stats, grads, _, _ = _train_nft(model, adv)
    whole = [g.clone() for g in grads]
    assert sum(g.abs().sum() for g in whole) > 0
    again, grads, _, _ = _train_nft(model, adv, micro_batch=2)
    assert again["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    for a, b in zip(whole, grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


def test_a_step_along_the_nft_gradient_matches_preferred_samples_better(model):
    dit, _, _, velocity, _ = model
    adv = torch.tensor([1.0, -1.0, 1.0])
    _, _, x0, sigmas = _train_nft(model, adv)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    sigma = sigmas[0]
    x_t = (1 - sigma) * x0 + sigma * eps

    def flow_matching_error():
        with torch.no_grad():
            return ((velocity(x_t, sigma) - (eps - x0)) ** 2).flatten(1).mean(1)

    before = flow_matching_error()
    params = [p for p in dit.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-2)
    after = flow_matching_error()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    assert ((after - before) * adv).sum() < 0  # preferred rows moved toward their samples relative to the others


def test_old_policy_swap_update_and_decay(model):
    dit, gen, _, velocity, noise = model
    x, sigma = noise.expand(2, -1, -1, -1, -1), torch.tensor(0.6)
    old = nft.trainable_copy(dit)
    name = next(iter(old))
    with torch.no_grad():
        v_now = velocity(x, sigma)
        for t in old.values():
            t.mul_(0.5)
        with nft.old_policy(dit, old):
            v_old = velocity(x, sigma)
        assert torch.equal(velocity(x, sigma), v_now)  # restored on exit
    assert not torch.allclose(v_old, v_now)
    current = dict(dit.named_parameters())[name].detach().clone()
    before = old[name].clone()
    nft.update_old_(old, dit, 0.25)
    torch.testing.assert_close(old[name], 0.25 * before + 0.75 * current)
    # with the old adapters on the model the trained velocity is the old one: stats match the detached path
    stats_old, _, _, _ = _train_nft(model, torch.tensor([1.0, -1.0, 0.5]),
                                    old=lambda: nft.old_policy(dit, nft.trainable_copy(dit)))
    stats_on, _, _, _ = _train_nft(model, torch.tensor([1.0, -1.0, 0.5]))
    assert stats_old["loss"] == pytest.approx(stats_on["loss"], rel=1e-5) and max(stats_old["old_deviate"]) < 1e-10
    assert [nft.old_decay(s) for s in (0, 100, 499, 600)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert nft.old_decay(70, flat=75, ramp=0.0075, max_decay=0.999) == 0.0
    assert nft.old_decay(85, flat=75, ramp=0.0075, max_decay=0.999) == pytest.approx(0.075)


def test_train_nft_kl_term_needs_and_uses_the_reference(model):
    dit, gen = model[:2]
    with pytest.raises(InputError, match="reference"):
        _train_nft(model, torch.zeros(G), kl=1e-2)
    stats, grads, _, _ = _train_nft(model, torch.zeros(G), kl=1e-2,
                                    reference=lambda: dit_lora.reference_policy(gen, "lora"))
    assert min(stats["kl"]) > 0 and sum(g.abs().sum() for g in grads) > 0  # the adapters are pulled toward off


# -- 4. FLOP model (vans.bench) ---------------------------------------------------------------------------------

def test_stage2_rows_equal_the_hand_counts():
    from vans.flops import stage2_rows

    # today: rollout K·G·2 = 20·8·2 = 320; training 19 steps × 16 rows × (1 + 1.5 + 1 ckpt + 1 reference) = 1368
    assert stage2_rows(trained_steps=19) == {"rollout": 320, "train": 1368, "total": 1688}
    # Fast, branched at step 4, CFG: rollout 2·(4 + 16·8) = 264; training 2 × 16 × 4.5 = 144
    assert stage2_rows(trained_steps=2, prefix_steps=4) == {"rollout": 264, "train": 144, "total": 408}
    # MixGRPO w 4 from step 7, guidance 1: rollout 7 + 13·8 = 111; training 4 × 8 × 4.5 = 144
    assert stage2_rows(rollout_cfg=False, train_cfg=False, trained_steps=4, prefix_steps=7)["total"] == 255
    # NFT, guidance 1, T 4, old-policy forward: rollout 160; training 4 × 8 × (3.5 + 1) = 144; on-policy 4 × 8 × 3.5
    assert stage2_rows(rollout_cfg=False, train_cfg=False, trained_steps=4)["total"] == 304
    assert stage2_rows(rollout_cfg=False, train_cfg=False, trained_steps=4, no_grad_forwards=0)["total"] == 272


def test_stage2_projection_at_the_real_size():
    from vans.flops import stage2_modes, stage2_projection

    modes = stage2_modes()
    # the window's starts are 0 … 8 (window (0, 0.5) of 20 steps, size 2): mean branch point 4
    assert modes["window (Fast, branched), CFG"]["prefix_steps"] == 4.0
    table = {row["mode"]: row for row in stage2_projection(modes)}
    default = table["flow_grpo all, CFG (default)"]
    assert default["total"] == 1688 and default["speedup"] == 1.0
    assert default["projected_s"] == pytest.approx(1688 * 0.344 / 2, rel=1e-9)  # 0.172 s per row forward
    assert default["pflop"] == pytest.approx(112.3, abs=0.1)
    assert table["window (Fast, branched), CFG"]["total"] == 408
    assert table["nft, guidance 1, old policy"]["total"] == 304
    assert table["nft, guidance 1, on-policy"]["speedup"] == pytest.approx(1688 / 272)
    # sliding over 1000 steps, moving every 25: 40 windows with starts 0 … 18, 0 … 18, 0, 1 → mean 343/40; windows of
    # 4 cut before step 19 (starts 16, 17, 18 train 3, 2, 1) → (2·(16·4 + 6) + 8)/40 = 3.7 trained steps
    sliding = modes["sliding (MixGRPO), CFG"]
    assert sliding["prefix_steps"] == pytest.approx(343 / 40) and sliding["trained_steps"] == pytest.approx(3.7)
    assert table["sliding (MixGRPO), CFG"]["total"] == pytest.approx(2 * (343 / 40 + (20 - 343 / 40) * 8)
                                                                     + 3.7 * 16 * 4.5)
