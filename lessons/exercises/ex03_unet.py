"""Exercises for lesson 03, attention in the UNet. Check them with:  python -m minildm.check 03

The references are `minildm.unet.attention` (the explicit path `Attention` takes when `record` is set)
and `minildm.unet.Attention`. Shapes: B batch, nh heads, N queries (h*w image
positions), M keys (L = 77 tokens for cross-attention), hd = width per head.
"""
import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Scaled dot-product attention. q (B, nh, N, hd), k and v (B, nh, M, hd).

    weights = softmax(q @ k^T / sqrt(hd)) over the last axis (each query's weights over the M keys
    sum to 1), shape (B, nh, N, M); output = weights @ v, shape (B, nh, N, hd).
    Return the pair (output, weights). Write the softmax with torch.softmax, not
    scaled_dot_product_attention (which does not return the weights).
    """
    raise NotImplementedError


def cross_attention(module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The forward pass of a `minildm.unet.Attention` module, written with your `attention`.

    x (B, N, C) image features, context (B, M, D) text features; the module has linear layers
    module.to_q (C -> C), module.to_k and module.to_v (D -> C), module.to_out (C -> C, a Sequential
    whose first item is the Linear), and module.num_heads = nh with C = nh * hd.
      1. q = to_q(x), k = to_k(context), v = to_v(context)
      2. split the channels into heads: (B, N, C) -> (B, N, nh, hd) -> (B, nh, N, hd)
      3. attention(q, k, v), then merge the heads back: (B, nh, N, hd) -> (B, N, C)
      4. return to_out(...)
    """
    raise NotImplementedError
