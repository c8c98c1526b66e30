"""Exercises for lesson 05, the VAE's posterior. Check them with:  python -m minildm.check 05

The references are `minildm.vae.reparameterize` and `minildm.vae.gaussian_kl`, which
`DiagonalGaussian.sample` and `.kl` use. The encoder outputs, per latent
element, a mean and a log-variance: q(z | x) = N(mean, exp(logvar)). Shapes: (B, zc, h, w).
"""
import torch


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(z | x) that gradients can flow through: z = mean + std * noise.

    std = exp(0.5 * logvar). The original code first clamps logvar to [-30, 20] so exp() stays
    finite; do the same (torch.clamp). noise ~ N(0, I) is given, shaped like mean.
    """
    raise NotImplementedError


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over each sample's latent: a tensor of shape (B,).

    Per element: 0.5 * (mean^2 + exp(logvar) - 1 - logvar). Clamp logvar to [-30, 20] first, as
    in reparameterize. Sum over every axis but the batch axis.
    """
    raise NotImplementedError
