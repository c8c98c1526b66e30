"""Exercise for lesson 08, the views. Check it with:  python -m minildm.check 08

Section 3, "Conditioning arithmetic", explains why noises are interpolated along a sphere.
"""
import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) between two tensors of one shape, each taken as one
    vector of all its elements: a at t = 0, b at t = 1, along the great circle between them in
    between, so that two noises of equal norm give noises of that norm.

    When a and b are (nearly) parallel the angle between them is (nearly) 0 and the formula divides by
    (nearly) zero; return the straight line (1 - t) a + t b there. Returns a's shape and dtype.
    """
    raise NotImplementedError
