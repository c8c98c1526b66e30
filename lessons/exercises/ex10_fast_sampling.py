"""Exercises for lesson 10, fast sampling. Check them with:  python -m minildm.check 10

Write each from lesson 10's section 1 ("Consistency: a model that jumps to the end"); the checks run
yours beside the package's LCM sampler with the same noises.
"""
import torch


def lcm_timesteps(num_steps: int) -> list:
    """The timesteps of an LCM run of `num_steps` steps on SD's 1000, highest first, as Python ints.

    The distillation only trained on a grid of 50 timesteps, every k-th one (k = 1000 // 50), the highest
    being 999 and the lowest k - 1. Counted from the top of that grid, step i (0-based) takes the grid
    position that num_steps steps spread evenly over 50, rounded down (lesson 10, "Where it steps").
    4 steps: [999, 759, 499, 259].
    """
    raise NotImplementedError


def boundary_scalings(t: float) -> tuple:
    """(c_skip, c_out) of LCM's consistency function f(z_t, t) = c_skip z_t + c_out x0_pred at timestep t
    (lesson 10, section 1): exactly (1, 0) at t = 0, and all but (0, 1) from t = 19 on."""
    raise NotImplementedError


def lcm_sample(eps_fn, z: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: list, noises: list) -> torch.Tensor:
    """The whole LCM sampling loop; returns the clean latent of the last step.

    eps_fn(z_t, t) -> the noise prediction, with t a (B,) float32 tensor of the timestep; z (B, ...) the
    start, at the noise level of timesteps[0]; alphas_cumprod (T,) abar_t; timesteps the run's, highest
    first; noises: len(timesteps) - 1 tensors shaped like z, the fresh noise each step but the last uses
    to carry its prediction down to the next timestep. Use your boundary_scalings.
    """
    raise NotImplementedError
