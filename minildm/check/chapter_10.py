"""The checks of chapter 10 (fast sampling): the LCM grid, its boundary condition and its loop."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .compare import Chapter, CheckFailed, compare, compare_number, _gen, _randn


def check_lcm_timesteps(impl) -> None:
    """lcm_timesteps(n) equals samplers.lcm_timesteps on SD's schedule for several n."""
    from ..samplers import lcm_timesteps
    from ..schedule import NoiseSchedule

    for n in (1, 2, 3, 4, 6, 7, 8, 50):
        expected = lcm_timesteps(NoiseSchedule.sd(), n).tolist()
        got = [int(t) for t in impl.lcm_timesteps(n)]
        if got != expected:
            raise CheckFailed(f"lcm_timesteps({n}): expected {expected}, got {got}")


def check_boundary_scalings(impl) -> None:
    """boundary_scalings(t) equals samplers.lcm_boundary_scalings where it matters: t = 0 to 19."""
    from ..samplers import lcm_boundary_scalings

    for t in (0, 0.05, 0.1, 1, 3, 19, 259):
        c_skip, c_out = lcm_boundary_scalings(t)
        got = impl.boundary_scalings(t)
        compare_number(f"boundary_scalings({t})[0] (c_skip)", got[0], c_skip, rel=1e-6)
        compare_number(f"boundary_scalings({t})[1] (c_out)", got[1], c_out, rel=1e-6)


def _smooth_eps(z_t, t):
    """A fixed, nonlinear stand-in for a UNet."""
    t = t.reshape(-1, *([1] * (z_t.ndim - 1))) / 1000.0
    return z_t * (0.9 + 0.1 * torch.cos(3.0 * t)) + 0.2 * torch.sin(3.0 * z_t.roll(1, dims=-1) + 2.0 * t)


def check_lcm_sample(impl) -> None:
    """lcm_sample with the same start and the same fresh noises equals samplers.sample_lcm, whose
    generator draws those noises in the same order; also at timesteps low enough for c_skip to count."""
    from ..samplers import lcm_timesteps, sample_lcm
    from ..schedule import NoiseSchedule

    schedule = NoiseSchedule.sd()
    for n in (1, 2, 4, 8):
        z = _randn(2, 4, 6, 6, seed=30 + n)
        expected = sample_lcm(_smooth_eps, z, schedule, n, generator=_gen(40 + n))
        g = _gen(40 + n)
        noises = [torch.randn(z.shape, generator=g) for _ in range(n - 1)]
        timesteps = lcm_timesteps(schedule, n).tolist()
        got = impl.lcm_sample(_smooth_eps, z.clone(), schedule.alphas_cumprod, timesteps, noises)
        compare(f"lcm_sample(eps_fn, z of shape {tuple(z.shape)}, alphas_cumprod, timesteps={timesteps}, "
                f"{n - 1} noises)", got, expected, atol=1e-5)
    # A last step at t = 1, where c_skip is 0.2: the boundary condition has to be in the loop.
    z = _randn(2, 4, 6, 6, seed=50)
    noise = _randn(2, 4, 6, 6, seed=51)
    a = schedule.alphas_cumprod
    from ..samplers import lcm_boundary_scalings

    def reference_two_steps(z):
        x0 = None
        for i, t in enumerate((19, 1)):
            eps = _smooth_eps(z, torch.full((z.shape[0],), float(t)))
            c_skip, c_out = lcm_boundary_scalings(t)
            x0 = c_out * (z - (1 - a[t]).sqrt() * eps) / a[t].sqrt() + c_skip * z
            if i == 0:
                z = a[1].sqrt() * x0 + (1 - a[1]).sqrt() * noise
        return x0

    got = impl.lcm_sample(_smooth_eps, z.clone(), a, [19, 1], [noise])
    compare("lcm_sample with timesteps [19, 1] (c_skip(1) = 0.2)", got, reference_two_steps(z), atol=1e-5)


def reference_10():
    from ..samplers import lcm_boundary_scalings, lcm_timesteps
    from ..schedule import NoiseSchedule

    def lcm_sample(eps_fn, z, alphas_cumprod, timesteps, noises):
        for i, t in enumerate(timesteps):
            a = alphas_cumprod[t]
            eps = eps_fn(z, torch.full((z.shape[0],), float(t)))
            c_skip, c_out = lcm_boundary_scalings(t)
            x0 = c_out * (z - (1 - a).sqrt() * eps) / a.sqrt() + c_skip * z
            if i == len(timesteps) - 1:
                return x0
            a_next = alphas_cumprod[timesteps[i + 1]]
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * noises[i]

    return SimpleNamespace(lcm_timesteps=lambda n: lcm_timesteps(NoiseSchedule.sd(), n).tolist(),
                           boundary_scalings=lcm_boundary_scalings, lcm_sample=lcm_sample)


CHAPTER_10 = Chapter("10", "10_fast_sampling", "latent consistency sampling",
                     {"lcm_timesteps": check_lcm_timesteps, "boundary_scalings": check_boundary_scalings,
                      "lcm_sample": check_lcm_sample}, reference_10)
