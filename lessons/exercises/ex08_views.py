"""Exercise for lesson 08, the views. Check it with:  python -m minildm.check 08

The reference is `minildm.views.slerp` (in minildm/views/core.py).
"""
import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape, treated as single vectors.

    theta = the angle between a and b: cos(theta) = <a, b> / (|a| |b|), with the dot product and the
    norms over ALL elements (clamp the cosine to [-1, 1] before acos).
        slerp(a, b, t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
    When sin(theta) is tiny (a and b nearly parallel) return the straight line (1 - t) a + t b instead.
    Tip: compute in float64 (a.double()) and convert back to a's dtype at the end.
    """
    raise NotImplementedError
