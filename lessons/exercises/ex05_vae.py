"""Exercises for lesson 05, the VAE's posterior. Check them with:  python -m minildm.check 05

Lesson 05, section 3 ("The posterior: reparameterisation and KL"), has the equations. The encoder
outputs, per latent element, a mean and a log-variance: q(z | x) = N(mean, exp(logvar)).
Shapes: (B, zc, h, w). Like the original code, clamp logvar to [-30, 20] before using it, so that its
exponential stays finite.
"""
import torch


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(z | x) made from the given standard normal noise (shaped like mean) so that
    gradients reach both mean and logvar: the reparameterisation trick (Kingma & Welling 2014)."""
    raise NotImplementedError


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z | x) || N(0, I)) in closed form, summed over each sample's latent elements: shape (B,).

    Zero for the prior itself (mean 0, logvar 0), never negative.
    """
    raise NotImplementedError
