"""softmax(q kᵀ / √d) v, the one attention product the VAE, the text encoder and the UNet share.

PyTorch's fused kernel (`F.scaled_dot_product_attention`) computes it without storing the weights.
One case is worth handling here: bfloat16 on a CPU. There the kernel's backward pass is about three
times slower in bfloat16 than in float32 (its forward is no faster either), so under CPU autocast or
with bfloat16 weights on a CPU the product runs in float32 and its result returns in bfloat16. That
is also the more accurate choice: softmax over bfloat16 logits keeps 8 bits of mantissa. On a GPU the
half-precision kernels are the fast ones and run as they are. bench/precision_speed.py measures it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q (..., N, d), k and v (..., M, d) -> (..., N, d); `causal` masks position j > i (N = M)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
