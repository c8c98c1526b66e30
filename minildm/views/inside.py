"""Looking inside one generation: the denoising filmstrip (view 1) and the cross-attention maps (view 2)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .core import (to_hwc_uint8, latent_to_image, image_strip, save_gif, aggregate_attention, decode_preview,
                   CrossAttentionRecorder, make_noise, encode, generate_from, show_image)


@dataclass
class Filmstrip:
    """Per sampling step: the noisy latent decoded, the predicted x0 decoded, the predicted noise."""

    steps: list            # step indices shown
    timesteps: list        # t at each shown step
    noisy: list            # uint8 (H, W, 3) per shown step
    x0_pred: list
    eps_pred: list
    image: np.ndarray      # the final image, uint8 (H, W, 3)
    figure: object = None
    gif_path: str | None = None
    frames: list = field(default_factory=list)


@torch.no_grad()
def denoising_filmstrip(ldm, prompt: str, *, num_steps: int = 20, sampler: str = "ddim",
                        guidance_scale: float = 7.5, seed: int = 0, height=None, width=None,
                        max_columns: int = 8, every: int = 1, gif_path=None,
                        gif_scale: int = 1) -> Filmstrip:
    """Watch one image being denoised; returns a `Filmstrip` with a figure (and a GIF if asked).

    The sampler's callback hands over z_t, x0_pred and eps_pred at every step. The noisy latent is
    decoded as it is (the VAE has never seen noise, so early frames look like coloured static); the
    predicted x0 is the model's current guess of the final latent; the predicted noise is shown as
    colours. At most `max_columns` evenly spaced steps go into the figure; the GIF has every kept
    step. `every` keeps only every k-th step (and the last): decoding twice per step is the slow
    part with SD's VAE on a CPU.
    """
    noise = make_noise(ldm, [seed], height, width)
    caught = []
    context = encode(ldm, [prompt])
    x = generate_from(ldm, context, noise, guidance_scale=guidance_scale, sampler=sampler,
                      num_steps=num_steps, seed=seed, callback=keep_steps(caught, every))
    strip = filmstrip_from_steps(ldm, caught, x, title=f'"{prompt}" - {sampler}, {num_steps} steps, '
                                                       f'guidance {guidance_scale}', max_columns=max_columns)
    if gif_path is not None:
        save_gif(strip.frames, gif_path, scale=gif_scale)
        strip.gif_path = str(gif_path)
    return strip


def keep_steps(caught: list, every: int = 1):
    """A sampler callback that appends to `caught` the first image's step, t, z_t, x0_pred and eps_pred
    at every `every`-th step and the last (on the CPU, so a long run on a GPU does not fill its memory)."""
    def callback(info):
        if info["step"] % every == 0 or info["step"] == info["num_steps"] - 1:
            t = info["t"]
            caught.append({"step": info["step"], "t": float(t.flatten()[0]) if torch.is_tensor(t) else float(t),
                           **{k: info[k][:1].detach().float().cpu() for k in ("z_t", "x0_pred", "eps_pred")}})
    return callback


@torch.no_grad()
def filmstrip_from_steps(ldm, caught: list, x: torch.Tensor, *, title: str = "", max_columns: int = 8,
                         shown_only: bool = False, max_latent_side: int | None = None) -> Filmstrip:
    """The filmstrip of a generation already made: `caught` from `keep_steps`, `x` its final image(s)
    in [-1, 1]. `shown_only` decodes only the steps the figure shows (no GIF frames), and
    `max_latent_side` decodes them from latents shrunk to that size (`decode_preview`): what a page
    wants from SD's VAE on a CPU, where each full-size decode takes seconds."""
    if shown_only:
        caught = [caught[i] for i in evenly_spaced(len(caught), max_columns)]
    if max_latent_side is None:
        def decode(z):
            return to_hwc_uint8(ldm.decode_latents(z.to(ldm.device)))[0]
    else:
        def decode(z):
            return decode_preview(ldm, z, max_latent_side)
    noisy = [decode(c["z_t"]) for c in caught]
    x0s = [decode(c["x0_pred"]) for c in caught]
    size = noisy[0].shape[:2]
    epss = [to_hwc_uint8(latent_to_image(c["eps_pred"], size))[0] for c in caught]
    strip = Filmstrip(steps=[c["step"] for c in caught], timesteps=[c["t"] for c in caught], noisy=noisy,
                      x0_pred=x0s, eps_pred=epss, image=to_hwc_uint8(x)[0])
    if max_latent_side is None:                       # the GIF's frames, at the image's size
        strip.frames = [image_strip([a, b, c]) for a, b, c in zip(noisy, x0s, epss)] + \
                       [image_strip([strip.image, strip.image, np.full_like(strip.image, 255)])]
    strip.figure = plot_filmstrip(strip, title=title, max_columns=max_columns)
    return strip


def evenly_spaced(n: int, k: int) -> list:
    """k indices from 0 to n-1 inclusive, evenly spaced (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]


def plot_filmstrip(strip: Filmstrip, title: str = "", max_columns: int = 8):
    """A 3-row figure: noisy latent decoded / predicted x0 decoded / predicted noise, per step."""
    import matplotlib.pyplot as plt

    cols = evenly_spaced(len(strip.steps), max_columns)
    fig, axes = plt.subplots(3, len(cols), figsize=(1.6 * len(cols), 5.2), squeeze=False)
    rows = [("z_t decoded", strip.noisy), ("x0_pred decoded", strip.x0_pred),
            ("eps_pred", strip.eps_pred)]
    for r, (label, images) in enumerate(rows):
        for c, i in enumerate(cols):
            show_image(axes[r][c], images[i], f"step {strip.steps[i]}\nt={strip.timesteps[i]:.0f}" if r == 0 else "",
                       label if c == 0 else "")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# View 2: cross-attention maps
# ----------------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """A generated image and its prompt tokens' cross-attention maps."""

    image: np.ndarray       # uint8 (H, W, 3)
    tokens: list            # (position in the context, text) of each prompt token shown
    per_layer: dict         # layer name -> (L, hl, wl), averaged over steps
    average: torch.Tensor   # (L, H, W), averaged over steps and layers
    figure: object = None
    layer_figure: object = None


def prompt_tokens(tokenizer, prompt: str) -> list:
    """(context position, text) for each token of the prompt: position 0 is the start token."""
    ids = tokenizer.encode(prompt)[: tokenizer.context_length - 2]
    return [(i + 1, tokenizer.decode([tid]).strip() or "_") for i, tid in enumerate(ids)]


@torch.no_grad()
def attention_maps_view(ldm, prompt: str, *, num_steps: int = 20, sampler: str = "ddim",
                        guidance_scale: float = 7.5, seed: int = 0, height=None, width=None,
                        include_special: bool = False, guidance_interval=None) -> AttentionMaps:
    """Generate an image while recording every cross-attention layer; plot each token's map.

    The UNet's cross-attention modules call `record(name, weights)` with weights (B, nh, h*w, L)
    when their `record` attribute is set. We keep the conditional half of the guided batch,
    average over heads, sum over steps, and show: per token, the map averaged over all layers
    and steps laid over the image; and per layer, the maps of every prompt token.
    """
    noise = make_noise(ldm, [seed], height, width)
    context = encode(ldm, [prompt])
    with CrossAttentionRecorder(ldm.unet, num_images=1) as rec:
        x = generate_from(ldm, context, noise, guidance_scale=guidance_scale, sampler=sampler,
                          num_steps=num_steps, seed=seed, guidance_interval=guidance_interval)
    per_layer, average = aggregate_attention(rec.records, noise.shape[-2:], size=x.shape[-2:])
    tokens = prompt_tokens(ldm.tokenizer, prompt)
    if include_special or not tokens:
        tokens = [(0, "<start>")] + tokens + [(len(tokens) + 1, "<end>")]
    maps = AttentionMaps(image=to_hwc_uint8(x)[0], tokens=tokens, per_layer=per_layer, average=average)
    maps.figure = plot_token_maps(maps.image, average, tokens, title=f'"{prompt}"')
    maps.layer_figure = plot_layer_maps(per_layer, tokens)
    return maps


def plot_token_maps(image, maps, tokens, title: str = ""):
    """The image, then one panel per token with its attention map (normalised) over the image."""
    import matplotlib.pyplot as plt

    n = len(tokens) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.3), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_title("image", fontsize=8)
    for ax, (pos, text) in zip(axes[0][1:], tokens):
        m = maps[pos]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        ax.imshow(image)
        ax.imshow(m.cpu().numpy(), cmap="jet", alpha=0.5,
                  extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_title(text, fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_layer_maps(per_layer, tokens):
    """A grid: one row per cross-attention layer (name and resolution), one column per token."""
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, axes = plt.subplots(len(names), len(tokens), squeeze=False,
                             figsize=(1.3 * len(tokens) + 1.5, 1.2 * len(names) + 0.5))
    for r, name in enumerate(names):
        m = per_layer[name]
        for c, (pos, text) in enumerate(tokens):
            ax = axes[r][c]
            ax.imshow(m[pos].cpu().numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(text, fontsize=8)
            if c == 0:
                short = name.replace(".transformer_blocks.0.attn2", "")
                ax.set_ylabel(f"{short}\n{m.shape[1]}x{m.shape[2]}", fontsize=6, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    return fig
