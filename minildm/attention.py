"""softmax(q kᵀ / √d) v, the one attention product the VAE, the text encoder and the UNet share.

PyTorch's fused kernel (`F.scaled_dot_product_attention`) computes it without storing the weights.
One case is worth handling here: training in bfloat16 on a CPU. There the kernel's backward pass is
2-4 times slower in bfloat16 than in float32 at the shapes of the CIFAR models, while its forward pass
is only a little faster (bench/attention_speed.py). So when a backward pass will follow (q, k or v
needs a gradient) on a CPU in bfloat16, the product runs in float32 and its result returns in
bfloat16; stage 2 of the one-hour CPU run takes 1.23x the steps in the same time for it. Sampling
keeps the bfloat16 kernel, and a GPU always does: its half-precision kernels are the fast ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q (..., N, d), k and v (..., M, d) -> (..., N, d); `causal` masks position j > i (N = M)."""
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if training and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
