"""Exercises for lesson 06, training. Check them with:  python -m minildm.check 06

Lesson 06's sections "Stage 2: the objective in code" and "EMA: the weights you sample with" have what
these need.
"""
import torch
import torch.nn.functional as F


def training_loss(model, schedule, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """The "simple" diffusion objective (DDPM eq. 14) on one batch, a float32 scalar tensor: how far the
    model's noise prediction for the noised latents is from the noise that was added, in mean squared error.

    model(z_t, t, context) -> eps_pred; z0 (B, C, h, w) clean scaled latents; context (B, L, D); t (B,)
    long timesteps; noise like z0. `schedule.q_sample(z0, t, noise)` noises (your exercise 01).
    """
    raise NotImplementedError


def ema_update(shadow: dict, weights: dict, decay: float, num_updates: int) -> dict:
    """One update of the exponential moving average of a model's weights; returns a NEW dict.

    shadow and weights map the same names to tensors; num_updates counts this update (1 for the first
    call). The decay warms up as the original code's (LitEma's) does, lesson 06's min(decay, (1+n)/(10+n)),
    so that the first averages are not dominated by the random initial weights.
    """
    raise NotImplementedError
