"""Tests for minildm.schedule: the betas, the forward process and the conversions between predictions."""
import json
import math

import pytest
import torch

from minildm.schedule import NoiseSchedule

SCHEDULES = {
    "linear": NoiseSchedule.linear,
    "scaled_linear": NoiseSchedule.scaled_linear,
    "cosine": NoiseSchedule.cosine,
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_alphas_cumprod_decreases_from_near_one(name):
    """abar starts near 1, decreases strictly, and stays positive."""
    s = SCHEDULES[name]()
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    assert abar[0] > 0.99 and abar[-1] > 0
    assert (abar[1:] < abar[:-1]).all()


def test_sd_schedule_constants():
    """SD v1's schedule is linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps."""
    s = NoiseSchedule.sd()
    root = s.betas.double().sqrt()
    assert math.isclose(s.betas[0].item(), 0.00085, rel_tol=1e-6)
    assert math.isclose(s.betas[-1].item(), 0.012, rel_tol=1e-6)
    steps = root[1:] - root[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4)
    # the sigma range k-diffusion reports for SD v1: 0.0292 .. 14.6146
    assert math.isclose(s.sigmas[0].item(), 0.029168, rel_tol=1e-4)
    assert math.isclose(s.sigmas[-1].item(), 14.6146, rel_tol=1e-5)


def test_sd_schedule_matches_diffusers():
    """alphas_cumprod agrees with diffusers' scaled_linear schedule to float32 precision."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = NoiseSchedule.sd().alphas_cumprod
    rel = ((ours - ref.alphas_cumprod) / ref.alphas_cumprod).abs()
    assert rel.max() < 1e-5, f"max rel diff {rel.max():.3e}, mean {rel.mean():.3e}"


def test_cosine_schedule_matches_diffusers():
    """The cosine schedule agrees with diffusers' squaredcos_cap_v2 betas."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    diff = (NoiseSchedule.cosine().betas - ref.betas).abs()
    assert diff.max() < 1e-6, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_q_sample_at_t0_is_nearly_x0():
    """At t=0 the forward process barely touches the sample (std sqrt(beta_0))."""
    s = NoiseSchedule.sd()
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0)
    z = s.q_sample(x0, 0, noise)
    assert torch.allclose(z, x0, atol=0.05 * noise.abs().max().item())
    assert (z - x0).abs().max() > 0


def test_q_sample_statistics_and_no_mutation():
    """q_sample has mean sqrt(abar) x0 and variance 1 - abar per timestep, and leaves inputs untouched."""
    s = NoiseSchedule.sd()
    t = torch.tensor([10, 500, 999])
    x0 = torch.ones(3, 20000)
    noise = torch.randn(3, 20000)
    x0_copy, noise_copy = x0.clone(), noise.clone()
    z = s.q_sample(x0, t, noise)
    abar = s.alphas_cumprod[t]
    assert torch.allclose(z.mean(1), abar.sqrt(), atol=0.03)
    assert torch.allclose(z.var(1), 1 - abar, atol=0.03)
    assert torch.equal(x0, x0_copy) and torch.equal(noise, noise_copy)


def test_conversions_round_trip():
    """eps -> x0 -> eps and x0, eps -> v -> x0, eps are identities."""
    s = NoiseSchedule.sd()
    t = torch.tensor([0, 250, 999, 600])
    x0 = torch.randn(4, 3, 8, 8)
    eps = torch.randn_like(x0)
    z = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.x0_from_eps(z, t, eps), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(s.eps_from_x0(z, t, x0), eps, atol=2e-4, rtol=1e-4)
    v = s.v_from_x0_eps(x0, t, eps)
    torch.testing.assert_close(s.x0_from_v(z, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.eps_from_v(z, t, v), eps, atol=1e-5, rtol=1e-5)


def test_v_matches_diffusers_velocity():
    """v agrees with diffusers' get_velocity."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([3, 400, 999])
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    diff = (NoiseSchedule.sd().v_from_x0_eps(x0, t, eps) - ref.get_velocity(x0, eps, t)).abs()
    assert diff.max() < 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_snr_and_sigma():
    """SNR = abar / (1 - abar) and sigma = SNR^(-1/2) at integer timesteps."""
    s = NoiseSchedule.sd()
    t = torch.arange(0, 1000, 37)
    abar = s.alphas_cumprod[t].double()
    # 1 - abar loses digits in float32 near t=0, hence the looser tolerance on the first check
    torch.testing.assert_close(s.snr(t).double(), abar / (1 - abar), rtol=1e-4, atol=0)
    torch.testing.assert_close(s.snr(t), s.sigmas[t] ** -2, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.t_to_sigma(t), s.sigmas[t], rtol=1e-6, atol=0)
    assert (s.sigmas[1:] > s.sigmas[:-1]).all()


def test_sigma_t_round_trip():
    """sigma_to_t inverts t_to_sigma at fractional timesteps and clamps outside the table."""
    s = NoiseSchedule.sd()
    t = torch.tensor([0.0, 0.5, 13.25, 499.9, 998.5, 999.0])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    assert s.sigma_to_t(torch.tensor([1e-4, 1e3])).tolist() == [0.0, 999.0]


def test_to_dict_round_trip():
    """to_dict is JSON-serialisable and from_dict rebuilds the same betas, for every kind."""
    for s in [NoiseSchedule.sd(), NoiseSchedule.linear(50), NoiseSchedule.cosine(100),
              NoiseSchedule(torch.linspace(0.01, 0.2, 10))]:
        d = json.loads(json.dumps(s.to_dict()))
        assert torch.equal(NoiseSchedule.from_dict(d).betas, s.betas)


def test_sigma_table_is_built_in_float32_as_k_diffusion_and_diffusers_build_it():
    """sigma_t = sqrt((1 - abar_t) / abar_t) from the float32 abar table, in float32: at t = 0 the
    subtraction loses digits, and sigma_0 comes out 1.29e-5 above the float64 value (lesson 07). diffusers'
    table, built the same way from its own float32 abar, agrees to 1e-5 everywhere."""
    import sys
    from pathlib import Path

    import diffusers
    sys.path.insert(0, str(Path(__file__).parent))
    from test_samplers import SD15_SCHEDULER_CONFIG

    ours = NoiseSchedule.sd()
    reference = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    theirs = ((1 - reference.alphas_cumprod) / reference.alphas_cumprod) ** 0.5
    assert ((ours.sigmas - theirs).abs() / theirs).max() < 1e-5
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    exact = ((1 - abar) / abar).sqrt()
    assert abs((ours.sigmas[0].double() - exact[0]) / exact[0] - 1.29e-5) < 0.01e-5
