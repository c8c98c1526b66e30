"""Exercises for lesson 01, the forward process. Check them with:  python -m minildm.check 01

Replace each `raise NotImplementedError` with your own code (plain torch; no minildm calls except
reading `schedule.alphas_cumprod`). The reference is `minildm.schedule.NoiseSchedule`; read it
after you have tried.

Vocabulary: x0 the clean sample, z_t the noisy one, eps the noise, t the timestep (0 = least noisy),
abar_t = schedule.alphas_cumprod[t] the fraction of signal variance left at t.
"""
import torch


def q_sample(schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Noise x0 to timestep t:  z_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise   (DDPM eq. 4).

    x0, noise: (B, ...) tensors of one shape, e.g. (B, C, h, w).
    t: an int (the same timestep for the whole batch) or a LongTensor (B,) (one per sample).
    Look abar_t up in `schedule.alphas_cumprod` (float32, shape (T,)), reshape it so that it
    broadcasts against x0 ((B,) -> (B, 1, 1, 1) for images; use x0.ndim), and return a NEW tensor:
    do not change x0 or noise in place.
    """
    raise NotImplementedError


def x0_from_eps(schedule, z_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """Undo q_sample when the noise is known:  x0 = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t).

    Same shapes and conventions as q_sample. This is how every sampler turns a noise prediction
    into a guess of the clean sample (the "predicted x0").
    """
    raise NotImplementedError
