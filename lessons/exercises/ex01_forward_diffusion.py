"""Exercises for lesson 01, the forward process. Check them with:  python -m minildm.check 01

Replace each `raise NotImplementedError` with your own code: plain torch, reading nothing of the
schedule but `schedule.alphas_cumprod` (float32, shape (T,)). Lesson 01, "The forward process", has the
equations.

Vocabulary: x0 the clean sample, z_t the noisy one, eps the noise, t the timestep (0 = least noisy),
abar_t = alphas_cumprod[t] the fraction of signal variance left at t.
"""
import torch


def q_sample(schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(z_t | x0) (DDPM eq. 4) built from the given noise: signal sqrt(abar_t) and noise
    sqrt(1 - abar_t).

    x0, noise: (B, ...) tensors of one shape, e.g. (B, C, h, w). t: an int (one timestep for the whole
    batch) or a LongTensor (B,) (one per sample). Returns z_t shaped like x0, a new tensor: x0 and noise
    stay as they were.
    """
    raise NotImplementedError


def x0_from_eps(schedule, z_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """The clean sample x0 that q_sample noised into z_t with the noise eps: q_sample solved for x0.

    Same shapes and conventions as q_sample. Every sampler uses it to turn a noise prediction into a
    guess of the clean sample (the "predicted x0").
    """
    raise NotImplementedError
