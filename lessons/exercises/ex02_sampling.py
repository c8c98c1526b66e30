"""Exercises for lesson 02, sampling. Check them with:  python -m minildm.check 02

The references are `minildm.samplers.ddim_step` (with `ddim_sigma`) and `minildm.samplers.guidance`,
which `sample_ddim` and `cfg_denoiser` run; the check runs the package's DDIM loop and compares every
one of its steps with yours.
"""
import math

import torch


def ddim_step(z_t: torch.Tensor, eps_pred: torch.Tensor, alpha_cumprod_t: float,
              alpha_cumprod_prev: float, eta: float, noise) -> torch.Tensor:
    """One DDIM step from timestep t to the previous timestep of the sequence (DDIM eqs. 12 and 16).

    With a = alpha_cumprod_t and a_prev = alpha_cumprod_prev (plain floats):
      1. x0_pred = (z_t - sqrt(1 - a) * eps_pred) / sqrt(a)
      2. sigma   = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev)
      3. z_prev  = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - sigma**2) * eps_pred + sigma * noise
    `noise` is a tensor like z_t, or None when eta == 0 (then sigma is 0 and there is no noise term).
    Return z_prev, a new tensor shaped like z_t.
    """
    raise NotImplementedError


def guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional prediction towards (and past) the
    conditional one:  eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond).

    guidance_scale 1 gives eps_cond, 0 gives eps_uncond, 7.5 (SD's default) overshoots on purpose.
    """
    raise NotImplementedError
