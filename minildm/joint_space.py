"""Arithmetic between images and text in CLIP's joint space: "this photo, but a cat".

CLIP's two towers map a picture and a caption into one D_p-wide space, trained so that a picture and its
caption point the same way (clip_vision.py). In that space directions carry the meaning and lengths do
not: CLIP only ever compares embeddings by their cosine, and a caption's embedding has a length of its
own, unrelated to a picture's. So the arithmetic is done on unit vectors,

    u(v)     = v / |v|
    e        = sum_j w_j u(image_j) + a sum_k u(text(plus_k)) - a sum_k u(text(minus_k))
    result   = u(e) * L,        L = sum_j |w_j| |image_j| / sum_j |w_j|        (or `norm` when given)

and the result is given back a length the image-variations model knows. SD image variations
(lambdalabs/sd-image-variations-diffusers) was trained with an image's embedding as its one-token context,
length included, and zeros as its unconditional context; the UNet reads the length too, so the result
takes the (|w|-weighted mean) length of the images it was made from. Without an image nothing says what
that length should be: give it as `norm`, or pass an image with weight 0, which lends its length and
nothing else.

    image - a text("a dog") + a text("a cat")     this photo, but a cat (a: how far to move)
    0.3 image_1 + 0.7 image_2                     two pictures mixed
    text("a cat"), norm=L                         a caption drawn by a model that has only seen images

The images go through the variations model's own image encoder (its image_encoder/ is CLIP ViT-L/14's
image tower and projection), so with a = 0 the context is the plain variation's, to float rounding. The
texts need CLIP's text tower and its text_projection: SD v1's text_encoder/ is that tower without the
projection, so a full CLIP folder (openai/clip-vit-large-patch14, both towers) is loaded for them.

Notation and shapes:

    images         n PIL images or uint8 (C, H, W) tensors; w (n,) their weights, 1/n each by default
    plus, minus    captions, each moved towards (plus) or away from (minus) by a = weight
    tokens         (k, L) token ids, L = the text tower's positions (77)
    image_embeds   (n, D_p), text_embeds (k, D_p); the result (1, D_p), D_p = projection_dim (768)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .clip_vision import CLIPModel, preprocess
from .tokenizer import CLIPTokenizer

FULL_CLIP = "a full CLIP with both towers, such as openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class JointPrompt:
    """A recipe for one context of an image-variations model: images with weights, captions to move
    towards (plus) and away from (minus) with weight a, and optionally the length of the result.
    `LatentDiffusion.generate(image_prompt=JointPrompt(...))` draws it; `joint_embedding` computes it."""

    images: Sequence = ()                          # PIL images or uint8 (C, H, W) tensors
    image_weights: Sequence[float] | None = None   # one per image; None: equal weights summing to 1
    plus: Sequence[str] = ()                       # captions added, each with weight a
    minus: Sequence[str] = ()                      # captions subtracted, each with weight a
    weight: float = 1.0                            # a
    norm: float | None = None                      # the result's length; None: the images' weighted mean


def unit(v: torch.Tensor) -> torch.Tensor:
    """Each row of v (B, D) divided by its length."""
    return v / v.norm(dim=-1, keepdim=True)


def encode_images(images, image_encoder: CLIPModel) -> torch.Tensor:
    """Images -> image_embeds (n, D_p) float32: CLIP's preprocessing at the encoder's size, its projection."""
    pixels = preprocess(list(images), image_encoder.vision_model.cfg.image_size)    # (n, 3, S, S)
    weight = image_encoder.visual_projection.weight
    return image_encoder.encode_image(pixels.to(weight.device, weight.dtype)).float()


def encode_texts(texts: Sequence[str], text_clip: CLIPModel, tokenizer: CLIPTokenizer | None = None) -> torch.Tensor:
    """Captions -> text_embeds (k, D_p) float32: CLIP's tokens, its text tower pooled at <|endoftext|>, its
    text_projection. tokenizer None: CLIP's BPE at the tower's number of positions."""
    if tokenizer is None:
        tokenizer = CLIPTokenizer.default(context_length=text_clip.text_model.cfg.context_length)
    tokens = tokenizer(list(texts)).to(text_clip.text_projection.weight.device)       # (k, L)
    return text_clip.encode_text(tokens).float()


@torch.no_grad()
def joint_embedding(images=(), image_weights: Sequence[float] | None = None, plus: Sequence[str] = (),
                    minus: Sequence[str] = (), weight: float = 1.0, *, image_encoder: CLIPModel,
                    text_clip: CLIPModel | None = None, tokenizer: CLIPTokenizer | None = None,
                    norm: float | None = None) -> torch.Tensor:
    """u(sum_j w_j u(image_j) + a sum u(text(plus)) - a sum u(text(minus))) * L -> (1, D_p) float32.

    image_encoder embeds the images (an image-variations model's own); text_clip, a CLIPModel with its
    text tower, the captions. L is `norm`, else the images' lengths averaged with weights |w_j| (a plain
    mean when every weight is 0). image_weights default to 1/n each; a weight of 0 lends an image's
    length and nothing else."""
    images = _images(images)
    plus, minus = _texts("plus", plus), _texts("minus", minus)
    weights = _weights(image_weights, len(images))
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight}")
    if norm is not None and not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be a positive number (the length of the result), got {norm}")
    if not images and not (plus or minus):
        raise ValueError("nothing to embed: give images, or captions to add (plus) or subtract (minus)")
    if not images and norm is None:
        raise ValueError("with no image nothing gives the embedding its length: give norm= (the length the "
                         "image embeddings have), or an image with weight 0, which lends its length alone")
    width = image_encoder.visual_projection.out_features
    if plus or minus:
        if text_clip is None or text_clip.text_model is None:
            what = "no CLIP was given" if text_clip is None else "the CLIP given has no text tower"
            raise ValueError(f"captions in the joint space need CLIP's text tower and its projection, and {what}: "
                             f"load {FULL_CLIP} (LatentDiffusion.load_text_clip, --clip)")
        if text_clip.text_projection.out_features != width:
            raise ValueError(f"the CLIP's text tower projects to {text_clip.text_projection.out_features} wide but "
                             f"the image encoder to {width}: they are not one joint space")

    e = torch.zeros(width, device=image_encoder.visual_projection.weight.device)       # (D_p,)
    if images:
        image_embeds = encode_images(images, image_encoder)                            # (n, D_p)
        w = torch.tensor(weights, device=e.device)
        e = e + (w[:, None] * unit(image_embeds)).sum(0)
        lengths = image_embeds.norm(dim=-1)                                            # (n,)
        share = w.abs() if w.abs().sum() > 0 else torch.ones_like(w)
        length = (share * lengths).sum() / share.sum()
    if plus or minus:
        text_embeds = unit(encode_texts(plus + minus, text_clip, tokenizer)).to(e.device)   # (k, D_p)
        signs = torch.tensor([1.0] * len(plus) + [-1.0] * len(minus), device=e.device)
        e = e + weight * (signs[:, None] * text_embeds).sum(0)
    total = sum(abs(w) for w in weights) + abs(weight) * (len(plus) + len(minus))
    if e.norm() <= 1e-6 * total:  # the parts cancel (or all weigh 0)
        raise ValueError("the weighted sum is zero, so it points nowhere: give an image a weight, or a caption")
    length = torch.tensor(float(norm)) if norm is not None else length
    return (unit(e[None]) * length.to(e.device)).float()                               # (1, D_p)


def _images(images) -> list:
    """One image, a list, or a (n, C, H, W) uint8 batch -> a list of images."""
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _texts(name: str, texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{name}: every caption must be a non-empty string, got {texts!r}")
    return texts


def _weights(image_weights, n: int) -> list[float]:
    """The images' weights: as given (one per image, finite), or 1/n each."""
    if image_weights is None:
        return [1.0 / n] * n if n else []
    weights = [float(w) for w in image_weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} image weights for {n} images: give one weight per image")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"image weights must be finite numbers, got {weights}")
    return weights
