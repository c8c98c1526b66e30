"""Exercises for lesson 03, the UNet. Check them with:  python -m minildm.check 03

Each part of the network that predicts the noise: how it reads the timestep (lesson 03, section 1),
how a ResBlock lets time in (section 2), and attention with heads (section 4, "The attention
computation, once"). The checks compare yours with the package's own modules on random weights.

Shapes: B batch, C channels, nh heads, hd = C / nh the width per head, N queries (h*w image
positions), M keys (L = 77 tokens for cross-attention), D context width, E time-embedding width.
"""
import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of timesteps, as Stable Diffusion's weights expect it (lesson 03,
    section 1): t (B,) float, possibly fractional -> (B, dim).

    dim // 2 frequencies from 1 down towards 1/10000, cosines first then sines; for an odd dim the last
    column is 0.
    """
    raise NotImplementedError


def res_block(block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The forward pass of a UNet ResBlock (lesson 03, section 2's two equations), written with its parts.

    block has in_layers (GroupNorm, SiLU, 3x3 conv), emb_layers (SiLU, Linear E -> C_out), out_layers
    (GroupNorm, SiLU, Dropout, 3x3 conv) and skip_connection (identity, or a 1x1 conv where the width
    changes); each is a torch module you may call. x (B, C_in, h, w), emb (B, E) -> (B, C_out, h, w).
    """
    raise NotImplementedError


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Scaled dot-product attention, with its weights. q (B, nh, N, hd), k and v (B, nh, M, hd).

    Returns the pair (output (B, nh, N, hd), weights (B, nh, N, M)), each query's weights a probability
    distribution over the M keys (lesson 03's A_j). PyTorch's fused kernel does not hand out the weights,
    so write the product yourself.
    """
    raise NotImplementedError


def multi_head_attention(x: torch.Tensor, context: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                         w_v: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, num_heads: int):
    """Multi-head attention of the queries x to the keys and values of context, from the projection
    weights (lesson 03, "The attention computation, once").

    x (B, N, C), context (B, M, D) (context is x for self-attention). The weights are stored as torch's
    Linear layers store them, (out, in): w_q (C, C), w_k and w_v (C, D), no bias; the output projection
    w_out (C, C) with its bias b_out (C,). Head j owns channels j*hd to (j+1)*hd of Q, K and V.
    Returns the pair (output (B, N, C), weights (B, nh, N, M)); the weights are what the attention maps of
    lesson 08 draw.
    """
    raise NotImplementedError


def cross_attention(module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The output of one of the UNet's Attention modules on x (B, N, C) and context (B, M, D), computed from
    its weights (module.to_q, to_k, to_v: Linear layers without bias; module.to_out: a Sequential whose
    first item is the output Linear; module.num_heads), not by calling the module."""
    raise NotImplementedError
