"""Samplers: turn a noise predictor into samples by running the diffusion backwards.

Every sampler is a plain function with one signature (k-diffusion style):

    sample_<name>(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None,
                  **options) -> z_0

    eps_fn(z_t, t) -> eps_pred   the denoiser: a model that predicts the noise in z_t at timestep t
    z                            the starting latent in the variance-preserving scale, at the noise level
                                 of step `first_step` (pure N(0, I) noise for text-to-image)
    first_step                   skip the first steps of the num_steps-step sequence (img2img starts
                                 from a partly noised image; noise_level() says how noised)
    generator                    a torch.Generator for the noise that stochastic samplers add, or a
                                 list of them, one per image, so each image has its own stream
    callback(info)               called once per step with a dict: step, num_steps, t, z_t, x0_pred,
                                 eps_pred (z_t always in the variance-preserving scale)

Two families live here, and one sampler for distilled models.

* Discrete-time samplers (DDPM, DDIM, PLMS) walk a subsequence of the integer training timesteps and
  work on z_t directly. They follow the original Stable Diffusion (CompVis) code: DDIM and PLMS use
  timesteps 1, 1 + T/n, 1 + 2T/n, ... (uniform spacing with a +1 offset) and, after the last one,
  the signal level abar_0 rather than 1. Strided DDPM, which the original code does not have, takes
  the same timesteps (as diffusers' DDPMScheduler with SD v1's scheduler config) and ends at abar = 1.
* The k-diffusion samplers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++(2M)) see the same model as
  the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma of the variance-exploding variable
  x = z_t / sqrt(abar_t) = x0 + sigma eps (Karras et al. 2022). DDIM with eta = 0 is Euler's method
  on this ODE. They walk a decreasing sequence of sigmas ending at 0, placed like diffusers'
  schedulers do (timesteps evenly spaced from T-1 to 0, or Karras spacing): see sigma_grid.
* LCM (latent consistency) samples models distilled to jump from z_t straight to a clean latent (an
  LCM, or SD with the LCM-LoRA merged): 1 to 8 steps on the distillation's grid of every 20th timestep,
  each predicting the endpoint and noising it afresh to the next timestep, as diffusers' LCMScheduler.

A text-to-image run starts from pure noise scaled by init_noise_scale(): 1 for the samplers that work
on z_t, and for Euler, Euler ancestral, Heun and LMS the scale that puts x at sigma_max * noise, which
is where diffusers' schedulers start (their init_noise_sigma), so one seed gives the same image in both.

Notation (code -> paper): abar = alphas_cumprod (abar_t), a / a_prev = abar at this and the next
step, x0_pred (x_0 estimate), eps_pred (epsilon_theta), eta (DDIM's eta), sigma (k-diffusion sigma),
h (DPM-Solver step in lambda = -log sigma), d (the ODE derivative dx/dsigma).
Shapes: z, z_t, x (B, ...), e.g. (B, C, h, w) latents or (B, 2) toy points; t (B,) float32.
"""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule

KARRAS_RHO = 7.0  # Karras et al. 2022 eq. 5: the spacing exponent they found best


# ---------------------------------------------------------------------------- timestep sequences


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
    """Timesteps of an n-step DDIM/PLMS/DDPM run as in the original SD code: uniform with a +1 offset.

    When n does not divide T the original code takes ceil(T / stride) steps; here it is always n.
    The offset is dropped when it would run past T-1 (e.g. n = T).
    """
    stride = schedule.num_timesteps // num_steps
    offset = 1 if (num_steps - 1) * stride + 1 < schedule.num_timesteps else 0
    return (torch.arange(num_steps) * stride + offset).flip(0)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. eq. 5: sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_grid(schedule: NoiseSchedule, num_steps: int, karras: bool = False):
    """The sigmas (n+1,) ending in 0, and the model timesteps (n,), of an n-step k-diffusion run.

    Default spacing as diffusers' Euler/Heun/DPM++ schedulers: timesteps evenly spaced from T-1 down to
    0 (fractional) with sigma interpolated linearly in the table. With `karras`, sigmas follow
    karras_sigmas between sigma(0) and sigma(T-1), and the timesteps are schedule.sigma_to_t(sigma).
    """
    table = schedule.sigmas.double()
    timesteps = torch.linspace(schedule.num_timesteps - 1, 0, num_steps, dtype=torch.float64)
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
        timesteps = schedule.sigma_to_t(sigmas.float()).double()
    else:
        low = timesteps.floor().long()
        high = timesteps.ceil().long()
        w = timesteps - low
        sigmas = (1 - w) * table[low] + w * table[high]
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.float(), timesteps.float()


def dpm_solver_grid(schedule: NoiseSchedule, num_steps: int, karras: bool = False):
    """The sigmas (n+1,) ending in 0, and the integer model timesteps (n,), of an n-step DPM-Solver run.

    Placed as diffusers' DPMSolverMultistepScheduler places them (its default "linspace" spacing):
    n+1 timesteps evenly spaced from 0 to T-1 and rounded, the most noisy n kept, each at the exact
    sigma of its table entry. With `karras`, the sigmas are Euler's Karras sigmas and the timesteps
    the nearest integers to schedule.sigma_to_t(sigma).
    """
    table = schedule.sigmas.double()
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
        timesteps = schedule.sigma_to_t(sigmas).round()
    else:
        timesteps = torch.linspace(0, schedule.num_timesteps - 1, num_steps + 1, dtype=torch.float64)
        timesteps = timesteps.round().flip(0)[:-1]
        sigmas = table[timesteps.long()]
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.float(), timesteps.float()


# ---------------------------------------------------------------------------- helpers


def noise_like(z: torch.Tensor, generator) -> torch.Tensor:
    """Gaussian noise shaped like z, from one generator or from a list of them, one per image (B of them)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(z.shape[1:], generator=g, device=z.device, dtype=z.dtype) for g in generator])
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def _call(eps_fn, z_t: torch.Tensor, t) -> torch.Tensor:
    """Evaluate the denoiser with one float32 timestep per sample."""
    t = torch.full((z_t.shape[0],), float(t), device=z_t.device, dtype=torch.float32)
    return eps_fn(z_t, t)


def _report(callback, step, num_steps, t, z_t, x0_pred, eps_pred):
    if callback is not None:
        callback({"step": step, "num_steps": num_steps, "t": float(t), "z_t": z_t,
                  "x0_pred": x0_pred, "eps_pred": eps_pred})


# ---------------------------------------------------------------------------- DDPM, DDIM, PLMS


@torch.no_grad()
def sample_ddpm(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None):
    """Ancestral sampling from the DDPM posterior q(z_prev | z_t, x0_pred) with its "fixed small" variance.

    With fewer steps than training timesteps, each step jumps between non-adjacent timesteps and the
    posterior is that of the jump (beta becomes 1 - abar_t / abar_prev).
    """
    timesteps = ddim_timesteps(schedule, num_steps)
    abar = schedule.alphas_cumprod.to(z.device)
    for i in range(first_step, num_steps):
        t = int(timesteps[i])
        a = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < num_steps else torch.ones_like(a)
        beta = 1 - a / a_prev
        eps_pred = _call(eps_fn, z, t)
        x0_pred = (z - (1 - a).sqrt() * eps_pred) / a.sqrt()
        _report(callback, i, num_steps, t, z, x0_pred, eps_pred)
        # DDPM eqs. 6-7: the mean and variance of the Gaussian posterior
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0_pred + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * z
        if t > 0:
            variance = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
            z = mean + variance.sqrt() * noise_like(z, generator)
        else:
            z = mean
    return z


def _ddim_alphas(schedule, timesteps, device):
    """abar at each step and at the step after it; after the last step comes abar_0 (as CompVis)."""
    abar = schedule.alphas_cumprod.to(device)
    a = abar[timesteps]
    a_prev = torch.cat([a[1:], abar[:1]])
    return a, a_prev


def ddim_sigma(a, a_prev, eta):
    """DDIM eq. 16: the noise scale of a step from abar = a to abar = a_prev; eta = 0 is the ODE, 1 DDPM."""
    return eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()


def ddim_step(z, eps_pred, a, a_prev, sigma=0.0, noise=None):
    """One DDIM step (eq. 12): predict x0, re-noise it to abar = a_prev along eps_pred, and add
    sigma * noise when noise is given. a, a_prev: tensors. Returns (z_prev, x0_pred)."""
    x0_pred = (z - (1 - a).sqrt() * eps_pred) / a.sqrt()
    z_prev = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).sqrt() * eps_pred
    if noise is not None:
        z_prev = z_prev + sigma * noise
    return z_prev, x0_pred


@torch.no_grad()
def sample_ddim(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like noise for eta = 1."""
    timesteps = ddim_timesteps(schedule, num_steps)
    a_all, a_prev_all = _ddim_alphas(schedule, timesteps, z.device)
    # DDIM eq. 16: the noise scale that interpolates between the ODE (eta=0) and DDPM (eta=1)
    sigmas = ddim_sigma(a_all, a_prev_all, eta)
    for i in range(first_step, num_steps):
        t = int(timesteps[i])
        eps_pred = _call(eps_fn, z, t)
        noise = noise_like(z, generator) if eta > 0 else None
        z_prev, x0_pred = ddim_step(z, eps_pred, a_all[i], a_prev_all[i], sigmas[i], noise)
        _report(callback, i, num_steps, t, z, x0_pred, eps_pred)
        z = z_prev
    return z


@torch.no_grad()
def sample_plms(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None):
    """Pseudo linear multistep (Liu et al. 2022) as the original PLMSSampler runs it.

    A DDIM step driven by an Adams-Bashforth combination of the last eps predictions (orders 2, 3, 4);
    the very first step has no history, so it takes a trial step and averages eps at both ends (Heun).
    """
    timesteps = ddim_timesteps(schedule, num_steps)
    a_all, a_prev_all = _ddim_alphas(schedule, timesteps, z.device)
    old_eps = []
    for i in range(first_step, num_steps):
        t = int(timesteps[i])
        a, a_prev = a_all[i], a_prev_all[i]
        eps_pred = _call(eps_fn, z, t)
        if not old_eps:
            z_trial, _ = ddim_step(z, eps_pred, a, a_prev)
            eps_next = _call(eps_fn, z_trial, int(timesteps[min(i + 1, num_steps - 1)]))
            eps_prime = (eps_pred + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps_pred - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps_pred - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps_pred - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        z_prev, x0_pred = ddim_step(z, eps_prime, a, a_prev)
        _report(callback, i, num_steps, t, z, x0_pred, eps_prime)
        old_eps = (old_eps + [eps_pred])[-3:]
        z = z_prev
    return z


# ---------------------------------------------------------------------------- k-diffusion samplers
# x = z_t / sqrt(abar) = z_t * sqrt(1 + sigma^2); the model still sees z_t = x / sqrt(1 + sigma^2).


def _denoise(eps_fn, x, sigma, t):
    """eps and the x0 estimate at noise level sigma (model timestep t), for x in the sigma scale."""
    eps_pred = _call(eps_fn, x / (sigma**2 + 1).sqrt(), t)
    return eps_pred, x - sigma * eps_pred


def _k_start(z, grid, first_step):
    """The grid's sigmas on z's device, its model timesteps, and z in the sigma scale at `first_step`."""
    sigmas, timesteps = grid
    sigmas = sigmas.to(z.device)
    return sigmas, timesteps, z * (sigmas[first_step] ** 2 + 1).sqrt()


def _k_denoise(eps_fn, x, sigmas, timesteps, i, num_steps, callback):
    """x0_pred at step i (noise level sigmas[i], model timestep timesteps[i]), shown to the callback."""
    eps_pred, x0_pred = _denoise(eps_fn, x, sigmas[i], timesteps[i])
    if callback is not None:
        _report(callback, i, num_steps, timesteps[i], x / (sigmas[i]**2 + 1).sqrt(), x0_pred, eps_pred)
    return x0_pred


def _slope(eps_fn, x, sigmas, timesteps, i, num_steps, callback):
    """The probability-flow ODE's direction at step i: dx/dsigma = (x - x0_pred) / sigma."""
    return (x - _k_denoise(eps_fn, x, sigmas, timesteps, i, num_steps, callback)) / sigmas[i]


@torch.no_grad()
def sample_euler(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, karras=False):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0_pred) / sigma (Karras et al. alg. 1)."""
    sigmas, timesteps, x = _k_start(z, sigma_grid(schedule, num_steps, karras), first_step)
    for i in range(first_step, num_steps):
        d = _slope(eps_fn, x, sigmas, timesteps, i, num_steps, callback)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_a(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, karras=False):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_next^2, with sigma_up chosen as in DDPM's ancestral step.
    """
    sigmas, timesteps, x = _k_start(z, sigma_grid(schedule, num_steps, karras), first_step)
    for i in range(first_step, num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _slope(eps_fn, x, sigmas, timesteps, i, num_steps, callback)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * noise_like(x, generator)
    return x


@torch.no_grad()
def sample_heun(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, karras=False):
    """Heun's second-order method on the ODE (Karras et al. alg. 1); the last step, to sigma=0, is Euler."""
    sigmas, timesteps, x = _k_start(z, sigma_grid(schedule, num_steps, karras), first_step)
    for i in range(first_step, num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _slope(eps_fn, x, sigmas, timesteps, i, num_steps, callback)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        _, x0_next = _denoise(eps_fn, x_euler, sigma_next, timesteps[i + 1])
        d_next = (x_euler - x0_next) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def lms_coefficients(sigmas: list, i: int, order: int) -> list:
    """The weights of the last `order` derivatives in one linear multistep step from sigmas[i] to sigmas[i+1].

    Through the derivatives d_i, d_{i-1}, ... at sigmas[i], sigmas[i-1], ... passes one polynomial
    p(sigma) = sum_j d_{i-j} l_j(sigma), with l_j the Lagrange basis polynomial that is 1 at sigmas[i-j]
    and 0 at the others. The step integrates it: x_next = x + sum_j d_{i-j} * (integral of l_j from
    sigmas[i] to sigmas[i+1]). l_j has degree order - 1 <= 3, which two-point Gauss-Legendre
    quadrature integrates exactly. sigmas: plain floats; returns [w_0, w_1, ...], w_0 for d_i.
    """
    nodes = [sigmas[i - k] for k in range(order)]
    a, b = sigmas[i], sigmas[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    points = (mid - half / 3**0.5, mid + half / 3**0.5)

    def basis(j, s):
        value = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                value *= (s - node) / (nodes[j] - node)
        return value

    return [half * sum(basis(j, s) for s in points) for j in range(order)]


@torch.no_grad()
def sample_lms(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, karras=False,
               order=4):
    """Linear multistep (Adams-Bashforth in sigma, as k-diffusion and diffusers' LMSDiscreteScheduler).

    Each step integrates the polynomial through the last `order` derivatives dx/dsigma (fewer at the
    start, while there is less history): lms_coefficients. Steps are placed by sigma_grid, like Euler.
    """
    sigmas, timesteps, x = _k_start(z, sigma_grid(schedule, num_steps, karras), first_step)
    sigma_list = sigmas.tolist()
    derivatives = []  # most recent last
    for i in range(first_step, num_steps):
        derivatives = (derivatives + [_slope(eps_fn, x, sigmas, timesteps, i, num_steps, callback)])[-order:]
        weights = lms_coefficients(sigma_list, i, len(derivatives))
        x = x + sum(w * d for w, d in zip(weights, reversed(derivatives)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None, karras=False):
    """DPM-Solver++(2M) (Lu et al. 2022): exact integration of the linear part in lambda = -log sigma,
    with x0_pred extrapolated linearly from the last two steps. First and last steps are first order.
    Steps are placed by dpm_solver_grid."""
    sigmas, timesteps, x = _k_start(z, dpm_solver_grid(schedule, num_steps, karras), first_step)
    x0_old, h_old = None, None
    for i in range(first_step, num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_pred = _k_denoise(eps_fn, x, sigmas, timesteps, i, num_steps, callback)
        if sigma_next == 0:
            x = x0_pred  # the exact solution once the noise level reaches 0
            continue
        h = sigma.log() - sigma_next.log()
        if x0_old is None:
            x0_mix = x0_pred
        else:
            r = h_old / h
            x0_mix = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_old
        # DPM-Solver++ eq. 9 in the sigma scale: x_next = (sigma_next/sigma) x + (1 - e^{-h}) x0
        x = (sigma_next / sigma) * x - torch.expm1(-h) * x0_mix
        x0_old, h_old = x0_pred, h
    return x


# ---------------------------------------------------------------------------- latent consistency


LCM_ORIGINAL_STEPS = 50      # the DDIM grid the LCM distillation walked: every k = T / 50 = 20 timesteps
LCM_TIMESTEP_SCALING = 10.0  # the boundary condition sees t * 10 ...
LCM_SIGMA_DATA = 0.5         # ... against this data scale


def lcm_timesteps(schedule: NoiseSchedule, num_steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """The n timesteps of an LCM run: n roughly even picks, from the top, of the distillation's grid.

    The distillation only ever saw timesteps k - 1, 2k - 1, ..., T - 1 (k = T / original_steps), so an
    LCM run takes step i at grid position floor(i * original_steps / n) counted down from T - 1:
    4 steps of SD v1's 1000 are 999, 759, 499, 259.
    """
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"an LCM run takes 1 to {original_steps} steps (the distillation's grid), got {num_steps}")
    if schedule.num_timesteps % original_steps:
        raise ValueError(f"LCM's grid needs a schedule of a multiple of {original_steps} timesteps, "
                         f"not {schedule.num_timesteps}")
    k = schedule.num_timesteps // original_steps
    grid = torch.arange(original_steps, 0, -1) * k - 1                 # T - 1, T - 1 - k, ..., k - 1
    return grid[torch.arange(num_steps) * original_steps // num_steps]


def lcm_boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function f(z, t) = c_skip z + c_out x0_pred at timestep t.

    c_skip -> 1 and c_out -> 0 as t -> 0 (f is the identity on clean data, the consistency models'
    boundary condition); with the timestep scaled by 10 both are already ~0 and ~1 from t = 19 up.
    """
    scaled = t * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(eps_fn, z, schedule, num_steps, *, first_step=0, generator=None, callback=None):
    """Latent consistency sampling (Luo et al. 2023; multistep sampling of Song et al. 2023, alg. 1).

    A consistency model maps a noisy z_t straight to a clean sample. Each step asks the model for it,
    then noises that sample afresh down to the next, lower timestep, and asks again; the last step
    returns the clean sample itself. A model distilled for this (an LCM, or SD with the LCM-LoRA
    merged) makes a good image in 2 to 8 steps. With an ordinary denoiser the same loop returns the
    average of the images z_t could become, so it looks blurred: LCM needs an LCM model.
    """
    timesteps = lcm_timesteps(schedule, num_steps)
    abar = schedule.alphas_cumprod.to(z.device)
    for i in range(first_step, num_steps):
        t = int(timesteps[i])
        a = abar[t]
        eps_pred = _call(eps_fn, z, t)
        c_skip, c_out = lcm_boundary_scalings(t)
        x0_pred = c_out * (z - (1 - a).sqrt() * eps_pred) / a.sqrt() + c_skip * z
        _report(callback, i, num_steps, t, z, x0_pred, eps_pred)
        if i == num_steps - 1:
            return x0_pred
        a_next = abar[timesteps[i + 1]]
        z = a_next.sqrt() * x0_pred + (1 - a_next).sqrt() * noise_like(z, generator)
    return z


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
}


def noise_level(sampler_name: str, schedule: NoiseSchedule, num_steps: int, first_step: int = 0,
                **options) -> float:
    """The abar at which a sampler expects its starting z when it begins at `first_step`.

    img2img noises its clean latent to this level (q_sample with abar) before sampling.
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {sorted(SAMPLERS)}")
    if not 0 <= first_step < num_steps:
        raise ValueError(f"first_step must be in [0, {num_steps}), got {first_step}")
    if sampler_name in ("ddpm", "ddim", "plms"):
        return float(schedule.alphas_cumprod[ddim_timesteps(schedule, num_steps)[first_step]])
    if sampler_name == "lcm":
        return float(schedule.alphas_cumprod[lcm_timesteps(schedule, num_steps)[first_step]])
    grid = dpm_solver_grid if sampler_name == "dpmpp_2m" else sigma_grid
    sigmas, _ = grid(schedule, num_steps, options.get("karras", False))
    return 1.0 / (1.0 + float(sigmas[first_step]) ** 2)


# The k-samplers that diffusers starts at x = sigma_max * noise (their schedulers' init_noise_sigma).
SIGMA_MAX_START = ("euler", "euler_a", "heun", "lms")


def init_noise_scale(sampler_name: str, schedule: NoiseSchedule, num_steps: int, **options) -> float:
    """What pure N(0, I) noise is multiplied by to become the starting z of a text-to-image run.

    In the variance-preserving scale the start is simply the noise (scale 1), and so it is for DDPM,
    DDIM, PLMS and DPM++ 2M, here and in diffusers. diffusers' Euler, Euler ancestral, Heun and LMS
    schedulers start from x = sigma_max * noise instead (their init_noise_sigma with the default
    "linspace" spacing), i.e. z = sigma_max / sqrt(1 + sigma_max^2) * noise, about 0.2% smaller for
    SD v1; this function returns that factor so that a seed gives the diffusers image. img2img does
    not use it: there the start is the noised image, as in diffusers.
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {sorted(SAMPLERS)}")
    if sampler_name not in SIGMA_MAX_START:
        return 1.0
    sigma_max = float(sigma_grid(schedule, num_steps, options.get("karras", False))[0][0])
    return sigma_max / (1 + sigma_max**2) ** 0.5


# ---------------------------------------------------------------------------- classifier-free guidance


def cfg_denoiser(model, context: torch.Tensor, uncond_context: torch.Tensor, guidance_scale: float,
                 interval: tuple | None = None):
    """Classifier-free guidance (Ho & Salimans 2022) as an eps_fn for any sampler.

    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond), with the conditional and
    unconditional predictions from one batched model call. model(z_t, t, context) -> eps;
    context (B, L, D); uncond_context (B, L, D) or (1, L, D).

    interval (t_lo, t_hi): guide only at timesteps t_lo <= t <= t_hi and use the conditional prediction
    alone elsewhere (a guidance interval, Kynkäänniemi et al. 2024). Guidance at the noisiest steps
    pulls every sample of a prompt towards one layout; leaving those steps unguided keeps more of the
    variety while the middle steps still make the picture follow the prompt. None: every step.
    """
    def guided(t) -> bool:
        if guidance_scale == 1.0:  # the unconditional half would cancel out exactly
            return False
        return interval is None or interval[0] <= float(t.flatten()[0]) <= interval[1]

    def eps_fn(z_t, t):
        if not guided(t):
            return model(z_t, t, context)
        batch = z_t.shape[0]
        uncond = uncond_context.expand(batch, *uncond_context.shape[1:])
        eps_uncond, eps_cond = model(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                     torch.cat([uncond, context])).chunk(2)
        return guidance(eps_uncond, eps_cond, guidance_scale)

    return eps_fn


def guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The guided prediction: from the unconditional one, guidance_scale times as far as the caption moves it."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
