"""Exercises for lesson 02, sampling. Check them with:  python -m minildm.check 02

Lesson 02's sections "DDIM: the same marginals without the noise" and "Classifier-free guidance" have
everything these need. The check runs the package's own DDIM sampler and guidance beside yours, on a
smooth stand-in for a UNet, and says where they part.

Vocabulary: z_t the noisy latent, t the timestep, eps_pred the model's noise prediction, abar_t
= alphas_cumprod[t], eta DDIM's noise knob. A denoiser is a function eps_fn(z_t, t) -> eps_pred with
t a (B,) float32 tensor.
"""
import math

import torch


def ddim_step(z_t: torch.Tensor, eps_pred: torch.Tensor, alpha_cumprod_t: float,
              alpha_cumprod_prev: float, eta: float, noise) -> torch.Tensor:
    """One DDIM step from the noise level abar_t = alpha_cumprod_t down to abar_prev = alpha_cumprod_prev
    (plain floats): DDIM eq. 12, with the noise scale sigma of eq. 16 set by eta.

    noise: a tensor shaped like z_t (the fresh noise of a stochastic step), or None when eta == 0.
    Returns z_prev, a new tensor shaped like z_t.
    """
    raise NotImplementedError


def ddim_sample(eps_fn, z: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: list, eta: float,
                generator: torch.Generator) -> torch.Tensor:
    """The whole DDIM sampler: from z, at the noise level of timesteps[0], down to the clean latent.

    timesteps: the run's timesteps as ints, highest first (981, 961, ..., 1 for SD's 50 steps: lesson 02
    says why the +1). Each step asks eps_fn for the noise in the current latent and moves to the next
    timestep's noise level; after the last timestep it moves to abar_0, as Stable Diffusion's DDIM does.
    With eta > 0 every step adds fresh noise: one draw of torch.randn(z.shape, generator=generator) per
    step, in step order (with eta == 0, draw nothing). Returns the final latent, shaped like z; z itself
    stays as it was.
    """
    raise NotImplementedError


def guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance's combination of the two predictions (Ho & Salimans 2022; lesson 02's
    equation): the unconditional prediction, moved guidance_scale times as far as the prompt moves it.

    guidance_scale 0 gives eps_uncond, 1 gives eps_cond, SD's default 7.5 overshoots on purpose.
    """
    raise NotImplementedError


def cfg_denoiser(model, context: torch.Tensor, uncond_context: torch.Tensor, guidance_scale: float):
    """A guided denoiser for any sampler: returns eps_fn(z_t, t) -> the guided eps_pred.

    model(z_t, t, context) -> eps_pred, for a batch of any size. context (B, L, D) is the prompt's,
    uncond_context (B, L, D) or (1, L, D) the empty prompt's (one row for the whole batch). At each call
    eps_fn evaluates the model once, on the conditional and the unconditional inputs stacked along the
    batch axis (2B rows: twice the work in one call, as SD does it), and combines the two halves
    with classifier-free guidance.
    """
    raise NotImplementedError
