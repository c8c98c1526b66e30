"""The conditional UNet that predicts noise: eps_pred = UNet(z_t, t, context).

This is the denoiser of Stable Diffusion v1, built the way the original `openaimodel.py` builds it:
a sinusoidal embedding of the timestep and its MLP, ResBlocks that add that embedding to their
features, a down path of resolution levels, a middle block, an up path that concatenates the skip
connections from the down path, and spatial transformers (self-attention, cross-attention to the text
context, a GEGLU feed-forward) at the levels the config names. Module names follow the original, so
`state_dict()` keys are the original checkpoint's keys without "model.diffusion_model.".

Notation (code -> paper, see lessons/03_unet.md):
    z_t       noisy latent z_t
    t         timestep t (may be fractional)
    emb       embedding of t (after the MLP; plus a class or pooled-text embedding when the config has one)
    w         guidance scale, an input only of LCM-distilled UNets (guidance_embed_dim)
    context   text context tau_theta(y), the output of the text encoder
    eps       noise prediction eps_theta(z_t, t, y)
    q, k, v   queries Q = W_Q phi(z), keys K = W_K tau(y), values V = W_V tau(y)

Shapes:
    B batch, C channels, h/w latent height/width, L context tokens (77 for SD), D context width,
    E time-embedding width (4 * model_channels), nh heads, hd head width (C / nh).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import scaled_dot_product


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class UNetConfig:
    in_channels: int = 4                 # channels of z_t (the VAE's latent channels)
    out_channels: int = 4                # channels of eps_pred (= in_channels for an eps model)
    model_channels: int = 320            # width of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)   # width multiplier per resolution level; one 2x downsample between levels
    num_res_blocks: int = 2              # ResBlocks per level on the way down (the way up has one more)
    attention_levels: tuple = (0, 1, 2)  # levels (0 = full resolution) with a spatial transformer after each ResBlock
    num_heads: int = 8                   # attention heads; head width = level width / num_heads
    transformer_depth: int = 1           # transformer blocks per spatial transformer
    context_dim: int = 768               # width D of the text context the cross-attention reads
    norm_groups: int = 32                # GroupNorm groups (the original fixes 32)
    dropout: float = 0.0                 # dropout inside ResBlocks and attention (the original trains with 0)
    num_classes: Optional[int] = None    # optional class labels y -> `label_emb` added to the time embedding
    pooled_context: bool = False         # also add a projection of the context's last token to the time
                                         # embedding (off for SD v1; see `UNet.forward`)
    guidance_embed_dim: Optional[int] = None  # LCM-distilled models: width of the guidance-scale embedding
                                         # added to the timestep's (diffusers' time_cond_proj_dim; see forward)

    def __post_init__(self):
        # Tuples, also when built from JSON lists, so configs compare equal.
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for mult in self.channel_mult:
            width = self.model_channels * mult
            if width % self.norm_groups or width % self.num_heads:
                raise ValueError(f"width {width} must divide by norm_groups={self.norm_groups} "
                                 f"and num_heads={self.num_heads}")

    @property
    def time_embed_dim(self) -> int:
        """Width E of the timestep embedding after its MLP (the original's 4 * model_channels)."""
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        """How much smaller the innermost level is than z_t: h and w must divide by this."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**d)

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion v1.x (v1.1 to v1.5 share it): 859,520,964 parameters."""
        return cls()

    @classmethod
    def cifar(cls) -> "UNetConfig":
        """A text-conditional UNet for 32x32 images: 35,052,932 parameters.

        Sized for 4-channel latents of 8x8 (a VAE with downsample factor 4, as VAEConfig.cifar())
        or 16x16 (factor 2): three levels give 8 -> 4 -> 2 (or 16 -> 8 -> 4). Width 128 and
        multipliers (1, 2, 2) as in the DDPM CIFAR-10 model (35.7M parameters). Attention at every
        level but the innermost, plus the middle block, is SD's own pattern, and costs little here:
        at most 8x8 = 64 queries (256 at 16x16). 4 heads; context width 256 as CLIPTextConfig.small().
        The pooled caption is added to the time embedding too (`pooled_context`), so a text encoder
        trained from scratch steers every ResBlock from the first step.
        """
        return cls(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                   num_heads=4, transformer_depth=1, context_dim=256, pooled_context=True)

    @classmethod
    def cifar_cpu(cls) -> "UNetConfig":
        """`cifar()` sized for an hour on a CPU: 8,516,740 parameters.

        Width 64, and attention only from the 4x4 level inward: at 8x8 latents the first level's
        self-attention over 64 positions cost 40% of a training step for little gain.
        """
        return cls(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1,),
                   num_heads=4, transformer_depth=1, context_dim=256, pooled_context=True)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """A UNet for tests: every kind of block, runs in milliseconds: 1,055,044 parameters."""
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                   num_heads=2, transformer_depth=1, context_dim=32, norm_groups=8)


# --------------------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first.

    Frequencies run geometrically from 1 down to 1/max_period (exclusive), as in the original
    (diffusers reproduces it with flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                        # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)    # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance scale as an LCM-distilled UNet reads it: (B,) -> (B, dim), sines first.

    The distillation folded classifier-free guidance into the model and told it the scale w, counted
    from 0 (w - 1 in the w of `samplers.guidance`) and times 1000, through sinusoids like a timestep's
    (frequencies 1 down to 1/10000 inclusive).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = (w.float() - 1) * 1000.0
    args = args[:, None] * freqs[None]                             # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters in place, as the original initialises the end of every residual branch.

    A fresh block is then the identity on its residual path and a fresh UNet predicts eps = 0, which
    keeps early training stable.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input's precision, as the original's GroupNorm32."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added between them, and a skip connection."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # A 1x1 convolution only where the width changes, so the residual can be added.
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))
        zero_(self.out_layers[-1])

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]      # one shift per channel, broadcast over h, w
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour repeat, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Scaled dot-product attention written out: (softmax(q k^T / sqrt(d)) v, the weights).
    q (B, nh, N, d), k and v (B, nh, M, d) -> out (B, nh, N, d), weights (B, nh, N, M), each row summing to 1."""
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return weights @ v, weights


class Attention(nn.Module):
    """Multi-head attention of queries from x to keys/values from `context` (or x itself).

    `record`: None, or a callable record(name, weights) that receives the attention weights
    (B, nh, N, M) each time the module runs; setting it switches to an explicit softmax.
    `slice_size`: None, or how many query positions to attend at once (less memory, same result).
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(dropout))
        self.name = ""                                   # set by UNet to the module's path
        self.record: Optional[Callable[[str, torch.Tensor], None]] = None
        self.slice_size: Optional[int] = None

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        M, nh = context.shape[1], self.num_heads
        q = self.to_q(x).view(B, N, nh, C // nh).transpose(1, 2)          # (B, nh, N, hd)
        k = self.to_k(context).view(B, M, nh, C // nh).transpose(1, 2)    # (B, nh, M, hd)
        v = self.to_v(context).view(B, M, nh, C // nh).transpose(1, 2)    # (B, nh, M, hd)
        if self.record is not None:
            out, weights = attention(q, k, v)                              # weights (B, nh, N, M)
            self.record(self.name, weights)
        elif self.slice_size is None or self.slice_size >= N:
            out = scaled_dot_product(q, k, v)
        else:
            out = torch.cat([scaled_dot_product(q[:, :, i:i + self.slice_size], k, v)
                             for i in range(0, N, self.slice_size)], dim=2)
        out = out.transpose(1, 2).reshape(B, N, C)                        # (B, N, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """A linear layer to twice the width; one half gates the other through a GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, then back."""

    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, feed-forward."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attn1 = Attention(dim, dim, num_heads, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, context_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the h*w positions of a feature map, with a residual around them."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, depth: int, groups: int,
                 dropout: float):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        # SD v1 projects with 1x1 convolutions (SD 2 switched to linear layers).
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, num_heads, dropout) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        zero_(self.proj_out)

    def forward(self, x, context):
        B, C, h, w = x.shape
        # A 1x1 convolution is a linear layer applied at every position; applied as one on the
        # (B, h, w, C) layout it needs no copy to and from the channels-first layout.
        y = self.norm(x).permute(0, 2, 3, 1)               # (B, h, w, C)
        y = F.linear(y, self.proj_in.weight.flatten(1), self.proj_in.bias).reshape(B, h * w, C)
        for block in self.transformer_blocks:
            y = block(y, context)                          # (B, h*w, C): one token per position
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.view(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also get the time embedding and transformers the context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """eps_pred = UNet(z_t, t, context): the SD v1 denoiser, sized by a UNetConfig."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, E, G, p = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups, cfg.dropout
        self.gradient_checkpointing = False

        def transformer(ch):
            return SpatialTransformer(ch, cfg.context_dim, cfg.num_heads, cfg.transformer_depth, G, p)

        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, E)
        if cfg.pooled_context:
            self.context_emb = nn.Linear(cfg.context_dim, E)
        if cfg.guidance_embed_dim is not None:
            self.guidance_embed = nn.Linear(cfg.guidance_embed_dim, mc, bias=False)

        # Down path: record every block's output width; the up path consumes them in reverse.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, E, mult * mc, G, p)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, E, ch, G, p), transformer(ch), ResBlock(ch, E, ch, G, p))

        # Up path: one more ResBlock per level than on the way down, each eating one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), E, mult * mc, G, p)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        zero_(self.out[-1])

        for name, module in self.named_modules():
            if isinstance(module, Attention):
                module.name = name

    # ----- options --------------------------------------------------------------------------------

    def cross_attention_modules(self) -> dict:
        """The cross-attention (attn2) modules by name, e.g. to set their `record` hook."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Attention) and name.endswith("attn2")}

    def set_attention_slicing(self, slice_size: Optional[int]) -> None:
        """Attend `slice_size` query positions at a time in every attention (None: all at once)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.slice_size = slice_size

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = enabled

    # ----- forward --------------------------------------------------------------------------------

    def _run(self, block, x, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, emb, context, use_reentrant=False)
        return block(x, emb, context)

    def forward(self, z_t: torch.Tensor, t, context: torch.Tensor, y: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None):
        """Predict the noise in z_t (B, C, h, w) at timesteps t ((B,) or a scalar) given context (B, L, D).

        `y` (B,) long: class labels, only for a config with `num_classes`. `guidance` ((B,) or a
        scalar): the guidance scale w, only for an LCM-distilled config (`guidance_embed_dim`), whose
        one call already gives the guided prediction.
        """
        B = z_t.shape[0]
        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        t_emb = timestep_embedding(t, self.cfg.model_channels)          # (B, mc)
        if self.cfg.guidance_embed_dim is not None:
            if guidance is None:
                raise ValueError("this UNet was distilled with the guidance scale as an input (an LCM): pass guidance")
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=z_t.device)
            w_emb = guidance_embedding(guidance.expand(B) if guidance.ndim == 0 else guidance, self.cfg.guidance_embed_dim)
            t_emb = t_emb + self.guidance_embed(w_emb.to(self.guidance_embed.weight.dtype)).float()
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.cfg.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass class labels y")
            emb = emb + self.label_emb(y)                               # (B, E)
        if self.cfg.pooled_context:
            # The whole caption as one vector, added where the timestep enters: every ResBlock then
            # sees the condition, not only the transformers' cross-attention. The last position is
            # end-of-text padding; in the causal text encoder it has attended to every token.
            emb = emb + self.context_emb(context[:, -1])                # (B, D) -> (B, E)

        x = z_t
        skips = []
        for block in self.input_blocks:
            x = self._run(block, x, emb, context)
            skips.append(x)
        x = self._run(self.middle_block, x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)                      # (B, C + C_skip, h, w)
            x = self._run(block, x, emb, context)
        return self.out(x)
