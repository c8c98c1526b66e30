"""Tests for minildm.samplers: parity with diffusers' schedulers, analytic results, determinism, guidance."""
import math

import pytest
import torch

from minildm.samplers import (
    SAMPLERS, cfg_denoiser, ddim_timesteps, dpm_solver_grid, init_noise_scale, lcm_boundary_scalings, lcm_timesteps,
    lms_coefficients, noise_level, sample_ddim, sample_lcm, sigma_grid,
)
from minildm.schedule import NoiseSchedule

SHAPE = (2, 4, 8, 8)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def smooth_eps(z_t, t):
    """A fixed, smooth, nonlinear stand-in for a UNet: depends on every pixel and on t."""
    t = t.reshape(-1, *([1] * (z_t.ndim - 1))) / 1000.0
    return z_t * (0.9 + 0.1 * torch.cos(3.0 * t)) + 0.2 * torch.sin(3.0 * z_t.roll(1, dims=-1) + 2.0 * t)


def start_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def report(ours, ref):
    diff = (ours - ref).abs()
    return f"max abs diff {diff.max():.3e}, mean abs diff {diff.mean():.3e}, ref scale {ref.abs().max():.3f}"


def run_diffusers(scheduler, num_steps, noise, generator=None, eta=None, patch_grid=None):
    """The usual diffusers denoising loop from `noise` scaled by the scheduler's own init_noise_sigma.

    Returns the final sample and the sample at the start of every step, in the variance-preserving
    scale (z_t = x / sqrt(1 + sigma^2) for the schedulers that work on x). Heun's corrector calls and
    PNDM's warm-up call (which see a trial sample, not a step's state) are left out of the list.
    """
    scheduler.set_timesteps(num_steps)
    if patch_grid is not None:
        scheduler.sigmas, scheduler.timesteps = patch_grid
    step_kwargs = {} if eta is None else {"eta": eta}
    if generator is not None:
        step_kwargs["generator"] = generator
    z = noise * scheduler.init_noise_sigma
    states = []
    for t in scheduler.timesteps:
        trial = (getattr(scheduler, "state_in_first_order", True) is False
                 or getattr(scheduler, "counter", None) == 1 and getattr(scheduler.config, "skip_prk_steps", False))
        if not trial:
            in_x_scale = hasattr(scheduler, "sigmas") and scheduler.init_noise_sigma != 1.0
            if in_x_scale:
                sigma = scheduler.sigmas[scheduler.step_index or 0]
                states.append(z / (1 + sigma**2).sqrt())
            else:
                states.append(z)
        model_in = scheduler.scale_model_input(z, t)
        eps = smooth_eps(model_in, torch.full((z.shape[0],), float(t)))
        z = scheduler.step(eps, t, z, **step_kwargs).prev_sample
    return z, states


def run_ours(name, num_steps, noise, generator=None, **options):
    """minildm's sampler from the same noise, started as a text-to-image run starts (init_noise_scale)."""
    schedule = NoiseSchedule.sd()
    states = []
    z = noise * init_noise_scale(name, schedule, num_steps, **options)
    out = SAMPLERS[name](smooth_eps, z, schedule, num_steps, generator=generator,
                         callback=lambda info: states.append(info["z_t"]), **options)
    return out, states


def assert_same_path(ours, ref, atol):
    """The final latents and every step's z_t agree."""
    (out, states), (ref_out, ref_states) = ours, ref
    assert len(states) == len(ref_states), (len(states), len(ref_states))
    for i, (a, b) in enumerate(zip(states, ref_states)):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {i}: {report(a, b)}"
    assert torch.allclose(out, ref_out, atol=atol, rtol=0), f"final: {report(out, ref_out)}"


# ---------------------------------------------------------------------------- parity with diffusers

ATOL = 1e-5  # float32 rounding of two independent implementations (measured: about 2e-6)

# Stable Diffusion v1.5's scheduler_config.json, as its model folder ships it: every diffusers scheduler
# below is built from it (from_config keeps the keys a scheduler knows and its defaults for the rest).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def sd15_scheduler(class_name, **overrides):
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, class_name).from_config({**SD15_SCHEDULER_CONFIG, **overrides})


@pytest.mark.parametrize("num_steps,eta", [(20, 0.0), (50, 0.0), (20, 0.5), (50, 0.5)])
def test_ddim_matches_diffusers(num_steps, eta):
    """DDIM (CompVis spacing with +1 offset, abar_0 after the last step) matches diffusers' DDIMScheduler."""
    sched = sd15_scheduler("DDIMScheduler")
    z = start_noise()
    ref = run_diffusers(sched, num_steps, z, torch.Generator().manual_seed(7), eta=eta)
    ours = run_ours("ddim", num_steps, z, torch.Generator().manual_seed(7), eta=eta)
    assert torch.equal(ddim_timesteps(NoiseSchedule.sd(), num_steps), sched.timesteps)
    assert_same_path(ours, ref, ATOL)


@pytest.mark.parametrize("num_steps", [20, 50])
def test_plms_matches_diffusers(num_steps):
    """PLMS with its warm-up step matches diffusers' PNDMScheduler as SD v1.5 configures it (skip_prk_steps)."""
    sched = sd15_scheduler("PNDMScheduler")
    z = start_noise()
    assert_same_path(run_ours("plms", num_steps, z), run_diffusers(sched, num_steps, z), ATOL)


@pytest.mark.parametrize("num_steps", [20, 50, 1000])
def test_ddpm_matches_diffusers(num_steps):
    """Ancestral DDPM, full and strided, matches diffusers' DDPMScheduler with the same injected noise."""
    # at 1000 steps SD v1.5's steps_offset=1 would send diffusers to t = 1000; the full chain is 999..0
    sched = sd15_scheduler("DDPMScheduler", **({"steps_offset": 0} if num_steps == 1000 else {}))
    z = start_noise()
    ref = run_diffusers(sched, num_steps, z, torch.Generator().manual_seed(3))
    ours = run_ours("ddpm", num_steps, z, torch.Generator().manual_seed(3))
    if num_steps < 1000:
        assert torch.equal(ddim_timesteps(NoiseSchedule.sd(), num_steps), sched.timesteps)
    assert_same_path(ours, ref, 5e-5)  # 1000 steps: about 2e-5


K_REFERENCES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}
K_CASES = [(name, karras) for name in K_REFERENCES for karras in (False, True)]


@pytest.mark.parametrize("name,karras", K_CASES, ids=[f"{n}-{'karras' if k else 'default'}" for n, k in K_CASES])
@pytest.mark.parametrize("num_steps", [20, 50])
def test_k_samplers_match_diffusers(name, num_steps, karras):
    """Euler, Euler ancestral, Heun and LMS match diffusers' schedulers from the same unit-variance noise,
    step by step, with and without Karras sigmas (diffusers' own start: init_noise_sigma)."""
    patch_grid = None
    if name == "euler_a" and karras:  # EulerAncestralDiscreteScheduler has no Karras option: Euler's grid
        grid = sd15_scheduler("EulerDiscreteScheduler", use_karras_sigmas=True)
        grid.set_timesteps(num_steps)
        sched = sd15_scheduler(K_REFERENCES[name])
        sched.set_timesteps(num_steps)
        patch_grid = (grid.sigmas, grid.timesteps)
    else:
        sched = sd15_scheduler(K_REFERENCES[name], **({"use_karras_sigmas": True} if karras else {}))
    z = start_noise()
    generator = torch.Generator().manual_seed(5) if name == "euler_a" else None  # the others take none
    ref = run_diffusers(sched, num_steps, z, generator, patch_grid=patch_grid)
    ours = run_ours(name, num_steps, z, torch.Generator().manual_seed(5), karras=karras)
    assert_same_path(ours, ref, ATOL)


def test_lms_coefficients_integrate_polynomials_exactly():
    """One LMS step of order k is exact when dx/dsigma is a polynomial of degree < k in sigma."""
    sigmas = [14.6, 9.0, 5.5, 3.1, 1.7, 0.0]
    for order, i in ((1, 0), (2, 1), (3, 2), (4, 3), (4, 4)):
        derivative = lambda s: 0.3 - 0.2 * s + 0.05 * s**2 - 0.004 * s**3 if order == 4 else 1.5 - 0.7 * s ** (order - 1)
        weights = lms_coefficients(sigmas, i, order)
        step = sum(w * derivative(sigmas[i - j]) for j, w in enumerate(weights))
        a, b = sigmas[i], sigmas[i + 1]
        if order == 4:
            exact = sum(c / (p + 1) * (b ** (p + 1) - a ** (p + 1)) for p, c in enumerate((0.3, -0.2, 0.05, -0.004)))
        else:
            exact = 1.5 * (b - a) - 0.7 / order * (b**order - a**order)
        assert step == pytest.approx(exact, rel=1e-12, abs=1e-12), (order, i)


def test_init_noise_scale():
    """Samplers on z_t start from the noise itself; Euler-type ones from x = sigma_max * noise."""
    schedule = NoiseSchedule.sd()
    for name in ("ddim", "plms", "ddpm", "dpmpp_2m"):
        assert init_noise_scale(name, schedule, 20) == 1.0
    for karras in (False, True):
        sigma_max = sigma_grid(schedule, 20, karras)[0][0].item()
        for name in ("euler", "euler_a", "heun", "lms"):
            assert init_noise_scale(name, schedule, 20, karras=karras) == pytest.approx(sigma_max / math.sqrt(1 + sigma_max**2))


@pytest.mark.parametrize("karras", [False, True], ids=["default", "karras"])
@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_dpmpp_2m_matches_diffusers(num_steps, karras):
    """DPM-Solver++(2M) matches diffusers' DPMSolverMultistepScheduler as it comes (its own step grid)."""
    sched = sd15_scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                           use_karras_sigmas=karras)
    z = start_noise()
    ref = run_diffusers(sched, num_steps, z)
    sigmas, timesteps = dpm_solver_grid(NoiseSchedule.sd(), num_steps, karras)
    assert torch.equal(timesteps.long(), sched.timesteps), (timesteps, sched.timesteps)
    assert torch.allclose(sigmas, sched.sigmas, rtol=1e-4, atol=0), report(sigmas, sched.sigmas)
    assert_same_path(run_ours("dpmpp_2m", num_steps, z, karras=karras), ref, ATOL)


def test_dpmpp_2m_img2img_start_matches_its_grid():
    """Starting DPM++ 2M part-way uses its own grid's noise level, not Euler's."""
    schedule = NoiseSchedule.sd()
    sigmas, _ = dpm_solver_grid(schedule, 20, False)
    assert noise_level("dpmpp_2m", schedule, 20, first_step=5) == pytest.approx(1 / (1 + sigmas[5].item() ** 2))
    assert noise_level("dpmpp_2m", schedule, 20, first_step=5) != noise_level("euler", schedule, 20, first_step=5)


def test_sigma_grid_matches_diffusers():
    """The k-sampler sigma grid (default and Karras) equals diffusers' Euler scheduler's sigmas and timesteps."""
    diffusers = pytest.importorskip("diffusers")
    for karras in (False, True):
        sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=karras)
        sched.set_timesteps(30)
        sigmas, timesteps = sigma_grid(NoiseSchedule.sd(), 30, karras)
        assert torch.allclose(sigmas, sched.sigmas, rtol=1e-5, atol=1e-6), report(sigmas, sched.sigmas)
        # sigma_to_t is ill-conditioned at large t (log sigma changes by ~0.2% per step) in float32
        assert torch.allclose(timesteps, sched.timesteps, rtol=0, atol=5e-3), report(timesteps, sched.timesteps)


# ---------------------------------------------------------------------------- analytic results


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_lcm_matches_diffusers(num_steps):
    """LCM (1 to 8 steps) matches diffusers' LCMScheduler built from SD v1.5's scheduler config, as the
    LCM-LoRA is used: the timesteps, every step's z_t with the same injected noise, and the result."""
    sched = sd15_scheduler("LCMScheduler")
    z = start_noise()
    ref = run_diffusers(sched, num_steps, z, torch.Generator().manual_seed(11))
    ours = run_ours("lcm", num_steps, z, torch.Generator().manual_seed(11))
    assert torch.equal(lcm_timesteps(NoiseSchedule.sd(), num_steps), sched.timesteps)
    assert_same_path(ours, ref, ATOL)


def test_lcm_timesteps_and_boundary_condition():
    """The distillation's grid (k = 20) picked from the top; c_skip = 1, c_out = 0 at t = 0; 1..50 steps."""
    schedule = NoiseSchedule.sd()
    assert lcm_timesteps(schedule, 4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(schedule, 1).tolist() == [999]
    assert lcm_timesteps(schedule, 50).tolist() == list(range(999, 0, -20))
    assert lcm_boundary_scalings(0) == (1.0, 0.0)
    c_skip, c_out = lcm_boundary_scalings(19)
    assert c_skip < 1e-5 and 1 - c_out < 1e-5
    for bad in (0, 51):
        with pytest.raises(ValueError, match="an LCM run takes 1 to 50 steps"):
            sample_lcm(smooth_eps, start_noise(), schedule, bad)


def gaussian_eps(mu, s, schedule):
    """The exact eps predictor for data N(mu, s^2): E[eps | z_t] is linear in z_t."""
    def eps_fn(z_t, t):
        t = t.reshape(-1, *([1] * (z_t.ndim - 1)))
        abar = schedule.alphas_cumprod[t.round().long()].double()
        # interpolate abar at fractional timesteps through sigma, as the k-samplers see it
        sigma = schedule.t_to_sigma(t.float()).double()
        abar = torch.where(t == t.round(), abar, 1 / (1 + sigma**2))
        a, noise_var = abar.sqrt(), 1 - abar
        var_z = a**2 * s**2 + noise_var
        return (noise_var.sqrt() * (z_t.double() - a * mu) / var_z).float()
    return eps_fn


# LCM returns the mean of what z_t could become at each step: right for a consistency model, which
# predicts one sample, but with this exact *denoiser* the spread shrinks (its own test is above)
DENOISING_SAMPLERS = sorted(set(SAMPLERS) - {"lcm"})


@pytest.mark.parametrize("name", DENOISING_SAMPLERS)
def test_samplers_recover_gaussian_data(name):
    """With the exact denoiser for Gaussian data, every sampler returns the data's mean and spread."""
    schedule = NoiseSchedule.sd()
    mu, s, num_steps = 1.0, 2.0, 200
    # start from the exact marginal at the first step: pure N(0, I) would be off by sqrt(abar_T) mu
    abar = noise_level(name, schedule, num_steps)
    z = math.sqrt(abar) * mu + math.sqrt(abar * s**2 + 1 - abar) * torch.randn(4000, 2)
    out = SAMPLERS[name](gaussian_eps(mu, s, schedule), z, schedule, num_steps,
                         generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.05, f"{name}: mean {out.mean():.4f}, expected {mu}"
    assert abs(out.std().item() - s) < 0.04, f"{name}: std {out.std():.4f}, expected {s}"


@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_eta0_matches_closed_form_on_gaussian_data(num_steps):
    """Deterministic DDIM with the exact Gaussian denoiser equals its closed-form step-by-step map."""
    schedule = NoiseSchedule.sd()
    mu, s = -0.2, 0.5
    z = torch.randn(64, 3)
    out = sample_ddim(gaussian_eps(mu, s, schedule), z, schedule, num_steps)
    # In x = z_t / sqrt(abar) with noise level sigma, x0_pred = mu + s^2 / (s^2 + sigma^2) (x - mu), so
    # one DDIM step x' = x0_pred + sigma' eps_pred scales x - mu by (s^2 + sigma sigma') / (s^2 + sigma^2).
    timesteps = ddim_timesteps(schedule, num_steps)
    sig = torch.cat([schedule.sigmas[timesteps], schedule.sigmas[:1]]).double()
    ratio = torch.prod((s**2 + sig[:-1] * sig[1:]) / (s**2 + sig[:-1] ** 2))
    x_start = z.double() * (1 + sig[0] ** 2).sqrt()
    expected = ((mu + ratio * (x_start - mu)) / (1 + sig[-1] ** 2).sqrt()).float()
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), report(out, expected)


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    """DDIM with eta=0 ignores the generator; with eta>0 the same seed gives the same samples."""
    schedule = NoiseSchedule.sd()
    z = start_noise()
    a = sample_ddim(smooth_eps, z, schedule, 10, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(smooth_eps, z, schedule, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample_ddim(smooth_eps, z, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(0))
    d = sample_ddim(smooth_eps, z, schedule, 10, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, d) and not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_samples_and_no_mutation(name):
    """Every sampler is reproducible from its generator, and leaves the caller's z untouched."""
    schedule = NoiseSchedule.sd()
    z = start_noise()
    z_copy = z.clone()
    runs = [SAMPLERS[name](smooth_eps, z, schedule, 8, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(z, z_copy)
    assert torch.isfinite(runs[0]).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_and_first_step(name):
    """The callback sees each remaining step once, and first_step skips the start of the sequence."""
    schedule = NoiseSchedule.sd()
    seen = []
    SAMPLERS[name](smooth_eps, start_noise(), schedule, 10, first_step=4, callback=seen.append)
    assert [info["step"] for info in seen] == list(range(4, 10))
    assert set(seen[0]) == {"step", "num_steps", "t", "z_t", "x0_pred", "eps_pred"}
    assert seen[0]["z_t"].shape == SHAPE and seen[0]["num_steps"] == 10
    assert seen[0]["t"] > seen[-1]["t"]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_img2img_start_recovers_a_clean_image_with_exact_denoiser(name):
    """Noised to noise_level(first_step), a point mass comes back with every sampler (up to DDIM's abar_0 noise)."""
    schedule = NoiseSchedule.sd()
    target = torch.full((16, 2), 0.7)
    abar = noise_level(name, schedule, 20, first_step=8)
    z = math.sqrt(abar) * target + math.sqrt(1 - abar) * torch.randn(16, 2)
    out = SAMPLERS[name](gaussian_eps(0.7, 1e-4, schedule), z, schedule, 20, first_step=8,
                         generator=torch.Generator().manual_seed(0))
    # DDIM and PLMS stop at abar_0 < 1, as the original does, which leaves noise of std sqrt(1 - abar_0)
    assert abs(out.mean().item() - 0.7) < 0.01 and out.std().item() < 0.04, f"{out.mean():.4f} +- {out.std():.4f}"


def test_noise_level_values():
    """noise_level gives abar of the first timestep run (discrete samplers) or 1 / (1 + sigma^2) (k-samplers)."""
    schedule = NoiseSchedule.sd()
    assert noise_level("ddim", schedule, 50) == schedule.alphas_cumprod[981].item()
    assert noise_level("plms", schedule, 50, first_step=25) == schedule.alphas_cumprod[481].item()
    assert noise_level("ddpm", schedule, 1000) == schedule.alphas_cumprod[999].item()
    assert noise_level("ddpm", schedule, 50) == schedule.alphas_cumprod[981].item()
    assert math.isclose(noise_level("euler", schedule, 30), schedule.alphas_cumprod[999].item(), rel_tol=1e-5)
    assert noise_level("lcm", schedule, 4, first_step=2) == schedule.alphas_cumprod[499].item()
    with pytest.raises(ValueError):
        noise_level("nope", schedule, 10)


# ---------------------------------------------------------------------------- classifier-free guidance


def test_cfg_denoiser_one_batched_call():
    """cfg_denoiser makes one call with [uncond, cond] and combines them with the guidance scale."""
    calls = []

    def model(z_t, t, context):
        calls.append((z_t.shape[0], context.clone()))
        return z_t * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000

    context = torch.full((2, 3, 5), 2.0)
    uncond = torch.full((1, 3, 5), 0.5)
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 10.0])
    eps = cfg_denoiser(model, context, uncond, 7.5)(z, t)
    assert len(calls) == 1 and calls[0][0] == 4
    assert torch.equal(calls[0][1][:2], uncond.expand(2, 3, 5)) and torch.equal(calls[0][1][2:], context)
    eps_u, eps_c = 0.5 * z + 0.01, 2.0 * z + 0.01
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u))
    torch.testing.assert_close(cfg_denoiser(model, context, uncond, 1.0)(z, t), eps_c)


def test_guidance_interval_guides_only_its_timesteps():
    """With an interval (t_lo, t_hi), steps inside it are guided exactly as without one, and steps outside
    it are the conditional prediction from one unbatched call; the ends belong to the interval."""
    calls = []

    def model(z_t, t, context):
        calls.append(z_t.shape[0])
        return z_t * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000

    context, uncond = torch.full((2, 3, 5), 2.0), torch.full((1, 3, 5), 0.5)
    z = torch.randn(2, 4, 4, 4)
    guided = cfg_denoiser(model, context, uncond, 7.5, interval=(100, 700))
    for timestep, inside in ((99.5, False), (100, True), (400, True), (700, True), (700.5, False), (999, False)):
        t = torch.tensor([timestep, timestep])
        calls.clear()
        eps = guided(z, t)
        expected = cfg_denoiser(model, context, uncond, 7.5)(z, t) if inside else model(z, t, context)
        torch.testing.assert_close(eps, expected, rtol=0, atol=0)
        assert calls[0] == (4 if inside else 2)
