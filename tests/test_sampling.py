"""Context-latent rule and flow-matching samplers (ODE, Flow-GRPO SDE)."""

import math

import pytest
import torch

from vans.context import context_indices, prepend_context, select_context, strip_context
from vans.sampling import (
    flow_sigmas,
    gaussian_logprob,
    gaussian_step_kl,
    sample_flow,
    sde_std,
    sde_step_logprob,
    sde_step_mean,
)


def test_flow_sigmas_match_the_shifted_schedule():
    # s = 1, .75, .5, .25 ; sigma = 5s / (1 + 4s) ; then the final 0
    expected = [1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0, 0.0]
    assert torch.allclose(flow_sigmas(4, shift=5.0), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(flow_sigmas(3, shift=1.0), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), atol=1e-6)


def test_context_indices_follow_the_official_truncated_linspace():
    assert context_indices(9, 6).tolist() == [0, 1, 3, 4, 6, 8]
    assert context_indices(6, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert context_indices(21, 6).tolist() == [0, 4, 8, 12, 16, 20]


def test_select_prepend_strip_roundtrip():
    latents = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 3, 9, 2, 2).clone()
    ctx = select_context(latents, 6)
    assert ctx[0, 0, :, 0, 0].tolist() == [0, 1, 3, 4, 6, 8]
    target = torch.randn(2, 3, 9, 2, 2)
    joined = prepend_context(ctx[:1], target)  # a batch-1 context is shared by the batch
    assert joined.shape == (2, 3, 15, 2, 2)
    assert torch.equal(joined[1, :, :6], ctx[0])
    assert torch.equal(strip_context(joined, 6), target)


def _point_mass_velocity(x0):
    # exact velocity field of a single data point x0: v = (x - x0) / sigma
    return lambda x, sigma: (x - x0) / sigma


def test_ode_sampler_transports_noise_onto_a_point_mass():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 3, 2, 2)
    noise = torch.randn_like(x0)
    out = sample_flow(_point_mass_velocity(x0), noise, num_steps=7, shift=5.0)
    assert torch.allclose(out.latents, x0, atol=1e-5)


def test_sde_with_zero_noise_reproduces_the_ode_sampler():
    torch.manual_seed(1)
    w = torch.randn(4, 4)

    def velocity(x, sigma):  # a nonlinear field, so nothing is exact by accident
        return torch.tanh(torch.einsum("ij,bjthw->bithw", w, x)) * (1 + sigma)

    noise = torch.randn(2, 4, 3, 2, 2)
    ode = sample_flow(velocity, noise, num_steps=10, noise_level=0.0).latents
    # the SDE mean formula with std -> 0 must reduce to the Euler step
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    s, s_next = torch.tensor(0.7), torch.tensor(0.5)
    assert torch.allclose(sde_step_mean(x, v, s, s_next, torch.tensor(0.0)), x + (s_next - s) * v, atol=1e-6)
    # and a vanishing noise level converges to the ODE sample
    g = torch.Generator().manual_seed(0)
    tiny = sample_flow(velocity, noise, num_steps=10, noise_level=1e-5, generator=g).latents
    assert torch.allclose(tiny, ode, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    big = sample_flow(velocity, noise, num_steps=10, noise_level=0.7, generator=g).latents
    assert not torch.allclose(big, ode, atol=1e-2)


def test_sde_step_logprob_equals_torch_normal_and_recomputes_exactly():
    torch.manual_seed(2)
    x, v = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.6)
    gen = torch.Generator().manual_seed(3)
    nxt, logprob, mean, std = sde_step_logprob(x, v, sigma, sigma_next, noise_level=0.7, sigma_cap=0.95, generator=gen)
    expected_std = 0.7 * math.sqrt(0.8 / 0.2) * math.sqrt(0.2)
    assert std.item() == pytest.approx(expected_std, rel=1e-5)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(nxt.double()).flatten(1).mean(1)
    assert torch.allclose(logprob.double(), ref, atol=1e-5)
    # recomputing the log-prob of the stored sample gives the same value: the first ratio is exactly 1
    _, again, _, _ = sde_step_logprob(x, v, sigma, sigma_next, noise_level=0.7, sigma_cap=0.95, prev_sample=nxt)
    assert torch.equal(torch.exp(again - logprob), torch.ones(3))


def test_sde_std_avoids_the_pole_at_sigma_one():
    std = sde_std(torch.tensor(1.0), torch.tensor(0.9), 0.7, sigma_cap=0.9)
    assert torch.isfinite(std) and std.item() == pytest.approx(0.7 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1), rel=1e-5)


def test_gaussian_step_kl_matches_torch_kl():
    m1, m2 = torch.randn(2, 10), torch.randn(2, 10)
    std = torch.tensor(0.3)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std), torch.distributions.Normal(m2, std))
    assert torch.allclose(gaussian_step_kl(m1, m2, std), ref.mean(1), atol=1e-6)
    assert torch.allclose(gaussian_logprob(m1, m1, std), torch.full((2,), -math.log(0.3) - 0.5 * math.log(2 * math.pi)))


def test_sde_sampler_preserves_the_data_marginal():
    """For Gaussian data N(0, c²) the exact velocity is known; the SDE (like the ODE) must end at std c.

    A wrong drift correction in the SDE mean changes the final spread, so this checks the formula.
    """
    c = 0.5

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * c**2 + sigma**2
        return (sigma - (1 - sigma) * c**2) / var * x

    noise = torch.randn(20000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    ode = sample_flow(velocity, noise, num_steps=200, shift=1.0).latents
    sde = sample_flow(velocity, noise, num_steps=200, shift=1.0, noise_level=0.7,
                      generator=torch.Generator().manual_seed(1)).latents
    assert ode.std().item() == pytest.approx(c, rel=0.02)
    assert sde.std().item() == pytest.approx(c, rel=0.02)
    assert abs(sde.mean().item()) < 0.03


def test_sampler_keeps_only_requested_steps_and_logprobs():
    noise = torch.randn(2, 1, 1, 2, 2)
    res = sample_flow(lambda x, s: x, noise, num_steps=6, noise_level=0.5, sde_steps=[1, 2], keep_steps=[1, 4],
                      generator=torch.Generator().manual_seed(0))
    assert sorted(res.states) == [1, 4]
    assert sorted(res.logprobs) == [1]  # step 4 ran as ODE: no log-prob
    assert res.logprobs[1].shape == (2,)
