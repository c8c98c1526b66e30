"""Image prompts for a model you trained: its own VAE's latents as a second context, read by new keys and values.

SD image variations turned a photo into a context with CLIP's image tower and fine-tuned the whole UNet
on it (clip_vision.py). A CIFAR run has no CLIP, and training one is not the point; it has a VAE encoder
that already turns any photo into latents the UNet understands. This chapter lets the trained model read
those latents as a prompt, without changing one of its weights:

    tokens  = LayerNorm(MLP(z_ref as h*w vectors of zc numbers) + position)        (B, N, D)
    attn2   = to_out( softmax(q k_textᵀ/√d) v_text  +  s · softmax(q k_imgᵀ/√d) v_img )
              k_img = to_k_ip(tokens), v_img = to_v_ip(tokens): one new pair per cross-attention layer
    emb     = emb + s · image_emb(mean of tokens)     for a UNet that adds the pooled caption to emb

This is the decoupled cross-attention of IP-Adapter (Ye et al., 2023): the text keeps its keys and values,
the image gets its own, and the two attention outputs add before the shared output projection. The base
model is frozen, and a row without an image gets no image term at all, so with no image prompt the model
is exactly the model you trained. to_k_ip and to_v_ip start as copies of the text's to_k and to_v (the
paper's start), image_emb at zero.

What the image teaches is chosen by the training pairs. Trained to denoise a photo given *itself* as the
prompt, the adapter learns to copy the prompt; given *another photo of the same class*, the only thing the
prompt can tell it is the class, so an image prompt then means "something like this", drawn the model's own
way. `ImageAdapterConfig.pairing` picks one ("class", the default, or "self").

How the image travels: the image tokens ride at the front of the context, (B, N + L, D), so the batching
that classifier-free guidance does (cond and uncond rows side by side) carries them for free. While the
adapter is attached (`with adapter.attached(unet):`), a hook on the UNet takes them off before anything
else reads the context, and the hooks on the cross-attention layers add the image term. A row whose image
tokens are all zeros has no image: the unconditional context, and every text prompt.

Notation and shapes:

    z_ref     (B, zc, h, w) the reference photo's latents, in the UNet's scale (ldm.encode_image)
    tokens    (B, N, D)     N = h * w image tokens, D = the UNet's context width
    context   (B, N + L, D) the image tokens, then the text context (B, L, D)
    s         the image prompt's weight (`scale`; 1 as trained)
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import scaled_dot_product


@dataclass
class ImageAdapterConfig:
    latent_channels: int = 8        # zc of the run's VAE
    latent_size: int = 8            # h = w of the reference latents (the run's resolution / the VAE's factor)
    context_dim: int = 256          # D, the UNet's context width
    emb_dim: int | None = 256       # the UNet's time-embedding width when it adds the pooled caption, else None
    pairing: str = "class"          # what a training image is prompted with: "class" another photo of its class, "self" itself

    @property
    def num_tokens(self) -> int:
        return self.latent_size ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageAdapterConfig":
        return cls(**d)


class LatentTokens(nn.Module):
    """z_ref (B, zc, h, w) -> tokens (B, N, D): a two-layer MLP per latent pixel, a learned position, a LayerNorm."""

    def __init__(self, cfg: ImageAdapterConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.latent_channels, cfg.context_dim), nn.GELU(),
                                 nn.Linear(cfg.context_dim, cfg.context_dim))
        self.position = nn.Parameter(torch.randn(cfg.num_tokens, cfg.context_dim) * 0.02)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, z_ref: torch.Tensor) -> torch.Tensor:
        x = self.mlp(z_ref.flatten(2).transpose(1, 2))                  # (B, N, D), row by row
        return self.norm(x + self.position)


class ImageAdapter(nn.Module):
    """The trainable part: LatentTokens, and for every cross-attention layer of the UNet a key and a value map
    for the image tokens (named like the layer, with / for .), plus image_emb when the UNet has a pooled path."""

    def __init__(self, cfg: ImageAdapterConfig, unet):
        super().__init__()
        self.cfg = cfg
        self.tokens = LatentTokens(cfg)
        self.to_k_ip, self.to_v_ip = nn.ModuleDict(), nn.ModuleDict()
        for name, attn in unet.cross_attention_modules().items():
            key = name.replace(".", "/")
            self.to_k_ip[key] = nn.Linear(cfg.context_dim, attn.to_k.out_features, bias=False)
            self.to_v_ip[key] = nn.Linear(cfg.context_dim, attn.to_v.out_features, bias=False)
            with torch.no_grad():
                self.to_k_ip[key].weight.copy_(attn.to_k.weight)
                self.to_v_ip[key].weight.copy_(attn.to_v.weight)
        self.image_emb = None
        if cfg.emb_dim is not None:
            self.image_emb = nn.Linear(cfg.context_dim, cfg.emb_dim)
            nn.init.zeros_(self.image_emb.weight)
            nn.init.zeros_(self.image_emb.bias)
        self.scale = 1.0
        self._image = None              # (B, N, D) while the UNet runs, stashed by the UNet's hook
        self._has_image = None          # (B, 1, 1) 1.0 for rows with an image prompt

    # ----- contexts --------------------------------------------------------------------------------

    def context(self, z_ref: torch.Tensor | None, text_context: torch.Tensor) -> torch.Tensor:
        """(B, N + L, D): the image tokens of z_ref (None: zeros, no image) in front of the text context."""
        B, _, D = text_context.shape
        if z_ref is None:
            image = text_context.new_zeros(B, self.cfg.num_tokens, D)
        else:
            image = self.tokens(z_ref.to(text_context.device, self.tokens.position.dtype)).to(text_context.dtype)
            image = image.expand(B, -1, -1) if len(image) == 1 else image
        return torch.cat([image, text_context], dim=1)

    # ----- attaching to the UNet --------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self, unet):
        """While inside, `unet` reads contexts made by `context` and adds the image term; outside, it is untouched."""
        handles = [unet.register_forward_pre_hook(self._split_context, with_kwargs=True)]
        for name, attn in unet.cross_attention_modules().items():
            handles.append(attn.register_forward_hook(self._image_attention(name.replace(".", "/"))))
        if self.image_emb is not None:
            if getattr(unet, "context_emb", None) is None:
                raise ValueError("this adapter adds a pooled image term beside a pooled caption, and this UNet has none")
            handles.append(unet.context_emb.register_forward_hook(self._image_embedding))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._image = self._has_image = None

    def _split_context(self, unet, args, kwargs):
        z_t, t, context = args[0], args[1], args[2] if len(args) > 2 else kwargs.pop("context")
        N = self.cfg.num_tokens
        if context.shape[1] <= N:
            raise ValueError(f"with an image adapter attached the context holds {N} image tokens before the text; "
                             f"got {context.shape[1]} positions in all (make it with ImageAdapter.context)")
        self._image = context[:, :N]
        self._has_image = (self._image.flatten(1).abs().amax(dim=1) > 0).to(context.dtype).view(-1, 1, 1)
        return (z_t, t, context[:, N:]) + tuple(args[3:]), kwargs

    def _image_attention(self, key):
        def hook(attn, inputs, out):
            x = inputs[0]
            B, n, C = x.shape
            nh, M = attn.num_heads, self._image.shape[1]
            q = attn.to_q(x).view(B, n, nh, C // nh).transpose(1, 2)                       # (B, nh, n, hd)
            k = self.to_k_ip[key](self._image).view(B, M, nh, C // nh).transpose(1, 2)     # (B, nh, N, hd)
            v = self.to_v_ip[key](self._image).view(B, M, nh, C // nh).transpose(1, 2)
            image = scaled_dot_product(q, k, v).transpose(1, 2).reshape(B, n, C)           # (B, n, C)
            # to_out is linear: to_out(a + s b) = to_out(a) + s W_out b (its bias is already in `out`)
            return out + self.scale * self._has_image * F.linear(image, attn.to_out[0].weight)
        return hook

    def _image_embedding(self, layer, inputs, out):
        pooled = self.image_emb(self._image.mean(dim=1))                                   # (B, E)
        return out + self.scale * self._has_image[:, :, 0] * pooled

    # ----- files -----------------------------------------------------------------------------------

    def save(self, path, metadata: dict | None = None) -> None:
        """A .safetensors file with the weights and, in its metadata, the config (and `metadata`)."""
        from safetensors.torch import save_file

        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"minildm_image_adapter": json.dumps(self.cfg.to_dict()),
                                              **{k: str(v) for k, v in (metadata or {}).items()}})


def photo_pixels(images, size: int) -> torch.Tensor:
    """Photos (PIL images or uint8 (C, H, W) tensors: one, a list or a (B, C, H, W) batch) -> x (B, 3, size, size)
    in [-1, 1], the way the run saw its training photos: the shorter side resized to `size` (bicubic, antialiased),
    the centre square cut out. Greyscale becomes RGB, transparency goes onto white (as CLIP's preprocessing)."""
    from PIL import Image

    from .clip_vision import _rgb, resize_and_crop

    if isinstance(images, (Image.Image, torch.Tensor)):
        images = [images] if isinstance(images, Image.Image) or images.dim() == 3 else list(images)
    out = [_rgb(image) for image in images]
    out = [image if image.shape[-2:] == (size, size) else resize_and_crop(image, size) for image in out]
    return torch.stack(out).float() / 127.5 - 1


def load_image_adapter(path, unet) -> ImageAdapter:
    """An ImageAdapter for `unet` from a file `ImageAdapter.save` wrote; strict: a file made for another
    UNet (other layers or widths) is refused, naming what differs."""
    from .convert import CheckpointError, read_safetensors

    state, meta = read_safetensors(str(path))           # a damaged or other file: one CheckpointError
    if "minildm_image_adapter" not in meta:
        raise CheckpointError(f"{path} is not an image adapter (no minildm_image_adapter config in its metadata)")
    cfg = ImageAdapterConfig.from_dict(json.loads(meta["minildm_image_adapter"]))
    pooled = unet.context_emb.out_features if unet.cfg.pooled_context else None
    if (cfg.context_dim, cfg.emb_dim) != (unet.cfg.context_dim, pooled):
        raise CheckpointError(f"{path} was made for another UNet: a {cfg.context_dim}-wide context and "
                              f"{'a pooled caption' if cfg.emb_dim else 'no pooled caption'}; this UNet reads a "
                              f"{unet.cfg.context_dim}-wide context and {'a pooled caption' if pooled else 'none'}")
    ref = next(unet.parameters())
    with torch.random.fork_rng(devices=[]):              # the layers' start is overwritten: leave the stream alone
        adapter = ImageAdapter(cfg, unet).to(ref.device)
    ours = adapter.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} was made for another UNet: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}, other shapes {wrong[:4]}")
    adapter.load_state_dict(state)
    return adapter.to(ref.dtype).eval().requires_grad_(False)
