"""The CLIP text transformer: tokens -> the context the UNet cross-attends to.

Stable Diffusion v1 conditions on the last hidden states of OpenAI's CLIP ViT-L/14 text encoder (the
final layer norm applied, no pooling, no projection): one D-dimensional vector per token position.
The architecture is GPT-2 shaped (lessons/04_text_encoder.md derives each piece):

    x   = token_embedding[tokens] + position_embedding[0..L-1]
    x   = x + Attention(LayerNorm(x))          causal: position i only sees positions <= i
    x   = x + MLP(LayerNorm(x))                fc1 -> QuickGELU -> fc2,  QuickGELU(a) = a * sigmoid(1.702 a)
          (the two lines above repeated num_layers times)
    context = LayerNorm(x)

Module names are those of the original checkpoint with "cond_stage_model.transformer.text_model."
removed, e.g. encoder.layers.0.self_attn.q_proj.weight. The checkpoint also stores
embeddings.position_ids (0..76); it carries no information, so it is not a buffer here.
The blocks below (attention, MLP, residual layer, encoder) also build CLIP's image tower,
clip_vision.py, which runs them without the causal mask.

Notation and shapes:

    tokens    LongTensor (B, L) of vocabulary ids, L <= context_length (77)
    context   (B, L, D) float, D = width (768 for ViT-L/14)
    nh, hd    attention heads and their width, D = nh * hd
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from .attention import scaled_dot_product


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # byte-level BPE vocabulary of minildm.tokenizer
    context_length: int = 77  # positions: <|startoftext|>, 75 tokens, <|endoftext|>
    width: int = 768  # D, the width of every token vector (and of the context)
    num_layers: int = 12  # residual attention + MLP blocks
    num_heads: int = 12  # nh; head width hd = width / num_heads
    mlp_width: int = 3072  # hidden width of each block's MLP
    layer_norm_eps: float = 1e-5  # as in CLIP

    @classmethod
    def vit_l14(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14's text encoder, the one SD v1 uses: 123,060,480 parameters."""
        return cls()

    @classmethod
    def small(cls) -> "CLIPTextConfig":
        """A text encoder to train from scratch with a small (CIFAR-size) model: 15,816,192 parameters.

        The vocabulary stays CLIP's, so the same tokenizer serves; the embedding table is most of it.
        32 positions instead of 77: CIFAR's template captions are at most 10 tokens, a sentence-long
        caption fits, and the encoder's cost (and the UNet's cross-attention keys) grows with the
        length: at 77 positions this encoder would cost more per training image than the CPU UNet.
        """
        return cls(context_length=32, width=256, num_layers=4, num_heads=4, mlp_width=1024)

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        """For tests and notebooks: 1,600,672 parameters."""
        return cls(width=32, num_layers=2, num_heads=2, mlp_width=64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        return cls(**d)


class TransformerSizes(Protocol):
    """What the shared blocks read from a config: CLIPTextConfig and clip_vision's CLIPVisionConfig both have it."""

    width: int
    num_layers: int
    num_heads: int
    mlp_width: int
    layer_norm_eps: float


class CLIPTextEmbeddings(nn.Module):
    """A learned vector per vocabulary entry plus a learned vector per position."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(nn.Module):
    """Multi-head self-attention. Causal for text: each token reads only itself and the tokens before it;
    not causal for an image: every patch reads every patch."""

    def __init__(self, cfg: TransformerSizes, *, causal: bool):
        super().__init__()
        assert cfg.width % cfg.num_heads == 0, "width must be a multiple of num_heads"
        self.num_heads = cfg.num_heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        nh = self.num_heads

        def heads(t):
            return t.view(B, L, nh, D // nh).transpose(1, 2)  # (B, nh, L, hd)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # softmax(q k^T / sqrt(hd) + causal mask) v, the mask being -inf above the diagonal (text only).
        out = scaled_dot_product(q, k, v, causal=self.causal)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """Two linear layers with QuickGELU between them: CLIP's sigmoid approximation of GELU."""

    def __init__(self, cfg: TransformerSizes):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # CLIP was trained with this approximation; exact GELU would shift every output slightly.
        h = h * torch.sigmoid(1.702 * h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """A pre-LN residual block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: TransformerSizes, *, causal: bool):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal=causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of residual blocks."""

    def __init__(self, cfg: TransformerSizes, *, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=causal) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """Tokens (B, L) -> context (B, L, D): embeddings, causal transformer, final layer norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, causal=True)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal weights and zero biases, as GPT-2 and CLIP start; only matters when training.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @torch.no_grad()
    def add_token_vectors(self, vectors: torch.Tensor) -> list[int]:
        """Append rows (n, D) to the token table, as a textual-inversion embedding does; returns their ids."""
        old = self.embeddings.token_embedding
        if vectors.dim() != 2 or vectors.shape[1] != old.embedding_dim:
            raise ValueError(f"token vectors must be (n, {old.embedding_dim}), got {tuple(vectors.shape)}")
        table = nn.Embedding(old.num_embeddings + len(vectors), old.embedding_dim,
                             device=old.weight.device, dtype=old.weight.dtype)
        table.weight[:old.num_embeddings] = old.weight
        table.weight[old.num_embeddings:] = vectors.to(table.weight)
        self.embeddings.token_embedding = table
        self.cfg = dataclasses.replace(self.cfg, vocab_size=table.num_embeddings)
        return list(range(old.num_embeddings, table.num_embeddings))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.cfg.context_length:
            raise ValueError(f"{L} tokens but the model has {self.cfg.context_length} positions")
        x = self.embeddings(tokens)  # (B, L, D)
        x = self.encoder(x)
        return self.final_layer_norm(x)
