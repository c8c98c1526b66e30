"""Exercises for lesson 06, training. Check them with:  python -m minildm.check 06

The references are `minildm.steps.diffusion_loss` and `minildm.steps.ema_update` (which `EMA` runs).
"""
import torch
import torch.nn.functional as F


def training_loss(model, schedule, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """The "simple" diffusion objective for one batch (DDPM eq. 14), a scalar tensor.

    z0 (B, C, h, w) clean scaled latents, context (B, L, D), t (B,) long timesteps, noise like z0.
      1. z_t = schedule.q_sample(z0, t, noise)       (you wrote this in exercise 01)
      2. eps_pred = model(z_t, t, context)
      3. return the mean squared error between eps_pred and noise (float32)
    """
    raise NotImplementedError


def ema_update(shadow: dict, weights: dict, decay: float, num_updates: int) -> dict:
    """One update of the exponential moving average of a model's weights; returns a NEW dict.

    shadow and weights map the same names to tensors. num_updates counts this update (1 for the
    first call). As the original code (LitEma) does, the decay warms up so that the first averages are
    not dominated by the random initial weights:
        d = min(decay, (1 + num_updates) / (10 + num_updates))
        new[k] = d * shadow[k] + (1 - d) * weights[k]
    """
    raise NotImplementedError
