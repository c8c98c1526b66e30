"""CLIP's image tower, and the space where images and captions meet.

CLIP was trained so that an image and its caption point the same way in one shared space. Stable
Diffusion v1 reads only the text tower's per-token context (clip_text.py); this chapter adds the image
tower, a Vision Transformer built from clip_text's blocks without the causal mask, and the two linear
maps into the shared space (lessons/04_text_encoder.md derives the text side):

    x  = [class_embedding, patch_embedding(pixels)] + position_embedding    1 + N tokens of width D
    x  = Encoder(LayerNorm_pre(x))                     clip_text's blocks; every patch sees every patch
    image_embeds = visual_projection(LayerNorm_post(x[:, 0]))         the class token, projected
    text_embeds  = text_projection(context[b, first <|endoftext|> of row b])
    logits       = exp(logit_scale) * cos(image_embeds, text_embeds)

patch_embedding is a convolution whose kernel and stride are the patch size: one linear map per patch.
The embeddings are not normalised: CLIP compares their directions (the cosine above), and a caller that
mixes or compares them normalises them first when it wants CLIP's similarity.

Module names are transformers' (vision_model.pre_layrnorm, sic; visual_projection; text_model.*;
text_projection; logit_scale), so the openai/clip-vit-large-patch14 folder, or an image_encoder/ folder
(transformers' CLIPVisionModelWithProjection: no text tower), loads strictly with `load_clip`.

Notation and shapes:

    pixels        (B, 3, S, S) float, from `preprocess`; S = image_size (224)
    P, N          patch side (14) and number of patches (S / P)^2 (256)
    x             (B, 1 + N, D) float, D = width (1024 for ViT-L/14)
    tokens        (B, L) token ids; context (B, L, D_text) as in clip_text.py
    image_embeds, text_embeds    (B, D_p) float, D_p = projection_dim (768)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from . import convert
from .clip_text import CLIPEncoder, CLIPTextConfig, CLIPTextModel

EOT_TOKEN = 49407  # <|endoftext|>, the last entry of CLIP's vocabulary
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per-channel statistics of CLIP's training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:
    image_size: int = 224  # S: the square side the position table was learned for
    patch_size: int = 14  # P: the side of the square patch that becomes one token
    in_channels: int = 3  # RGB
    width: int = 1024  # D, the width of every token vector
    num_layers: int = 24  # residual attention + MLP blocks
    num_heads: int = 16  # nh; head width hd = width / num_heads
    mlp_width: int = 4096  # hidden width of each block's MLP (QuickGELU, as in the text tower)
    layer_norm_eps: float = 1e-5  # as in CLIP
    projection_dim: int = 768  # D_p, the width of the space shared with the text tower

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def vit_l14(cls) -> "CLIPVisionConfig":
        """OpenAI CLIP ViT-L/14's image tower: 303,179,776 parameters, 303,966,208 with its projection."""
        return cls()

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """For tests and notebooks, 32-pixel images in 16 patches: 23,936 parameters, 24,448 with its projection."""
        return cls(image_size=32, patch_size=8, width=32, num_layers=2, num_heads=2, mlp_width=64, projection_dim=16)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        return cls(**d)


class CLIPVisionEmbeddings(nn.Module):
    """An image as 1 + N tokens: a learned class token, then one linear map of each P x P patch; plus a
    learned vector per position."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B = pixels.shape[0]
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D), row by row
        x = torch.cat([self.class_embedding.expand(B, 1, -1), patches], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """Pixels (B, 3, S, S) -> the class token's final vector (B, D): embeddings, a layer norm, the
    (non-causal) transformer, a layer norm on the class token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic, transformers' key name
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.apply(CLIPTextModel._init_weights)
        # OpenAI's scale for the class token and the position table: unit-length vectors on average.
        nn.init.normal_(self.embeddings.class_embedding, std=cfg.width ** -0.5)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=cfg.width ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixels.shape
        S = self.cfg.image_size
        if (C, H, W) != (self.cfg.in_channels, S, S):
            raise ValueError(f"pixels of shape (B, {C}, {H}, {W}) but the model reads (B, {self.cfg.in_channels}, "
                             f"{S}, {S}); preprocess(images, size={S}) makes them")
        x = self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype))  # (B, 1 + N, D)
        x = self.encoder(self.pre_layrnorm(x))
        return self.post_layernorm(x[:, 0])  # (B, D): the class token has read every patch


def pool_text(context: torch.Tensor, tokens: torch.Tensor, eot_token: int = EOT_TOKEN) -> torch.Tensor:
    """(B, L, D) text hidden states -> (B, D): each row's vector at its first end-of-text token.

    Under the causal mask that is the first position that has read the whole caption. OpenAI's code takes
    the position of the largest id, the same one for tokenizer output since <|endoftext|> is the last entry
    of the vocabulary; looking for the token itself stays right when textual-inversion tokens are
    appended after it."""
    is_eot = tokens == eot_token
    if not is_eot.any(dim=1).all():
        raise ValueError(f"every row of tokens needs an end-of-text token ({eot_token}) to pool at")
    first = is_eot.int().argmax(dim=1)  # argmax returns the first maximum
    return context[torch.arange(len(tokens), device=context.device), first]


class CLIPModel(nn.Module):
    """The image tower and, given a text config, the text tower, each with a linear map (no bias) into
    the projection_dim-wide shared space. Without a text config it is transformers'
    CLIPVisionModelWithProjection, the image encoder of SD image variations."""

    def __init__(self, vision: CLIPVisionConfig, text: CLIPTextConfig | None = None):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.width, vision.projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision.width ** -0.5)
        self.text_model = self.text_projection = self.logit_scale = None
        if text is not None:
            self.text_model = CLIPTextModel(text)
            self.text_projection = nn.Linear(text.width, vision.projection_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=text.width ** -0.5)
            # The inverse softmax temperature, learned as a logarithm; CLIP starts it at 1 / 0.07.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) from `preprocess` -> image_embeds (B, D_p), not normalised."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L) with an end-of-text token in each row -> text_embeds (B, D_p), not normalised.

        The pooled vector is one row of the very context SD v1 cross-attends to."""
        if self.text_model is None:
            raise ValueError("this CLIPModel has no text tower (it was built or loaded from an image encoder alone)")
        return self.text_projection(pool_text(self.text_model(tokens), tokens))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_images, B_texts): scaled cosine similarities, CLIP's zero-shot scores."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp() * image @ text.T


def load_clip(folder, device="cpu", dtype: torch.dtype | None = None) -> CLIPModel:
    """A CLIPModel from a transformers folder (config.json + model.safetensors): openai/clip-vit-large-patch14
    (both towers), or an image encoder alone such as SD image variations' image_encoder/.

    Strict: every tensor of the file used, every parameter filled, every shape equal; anything else is a
    convert.CheckpointError naming the keys. dtype None keeps the file's."""
    state, vision, text = convert.read_clip_folder(folder)
    with convert.empty_parameters():
        model = CLIPModel(vision, text)
    return convert.load_module("CLIP", model, state, dtype=dtype, device=device).eval()


# ----------------------------------------------------------------------------------------------------
# Preprocessing: images to the pixels CLIP was trained on


def _rgb(image) -> torch.Tensor:
    """A PIL image or a uint8 (1, 3 or 4, H, W) tensor -> uint8 (3, H, W); transparency onto white."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return TF.pil_to_tensor(image.convert("RGB")).contiguous()
    if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3
            and image.shape[0] in (1, 3, 4)):
        what = (f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                else type(image).__name__)
        raise TypeError(f"preprocess takes PIL images or uint8 (C, H, W) tensors with 1, 3 or 4 channels, not {what}")
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if image.shape[0] == 4:
        rgba = TF.to_dtype(image, torch.float32, scale=True)
        rgb, alpha = rgba[:3], rgba[3:]
        return TF.to_dtype(rgb * alpha + (1 - alpha), torch.uint8, scale=True)
    return image


def resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, size, size): the shorter side resized to `size`, the longer to
    int(size * long / short), bicubic with antialiasing; then the centred square (offset rounded down)."""
    H, W = image.shape[-2:]
    long = int(size * max(H, W) / min(H, W))
    image = TF.resize(image, [size, long] if H <= W else [long, size], interpolation=InterpolationMode.BICUBIC,
                      antialias=True)
    H, W = image.shape[-2:]
    top, left = (H - size) // 2, (W - size) // 2
    return image[:, top:top + size, left:left + size]


def preprocess(images, size: int = 224) -> torch.Tensor:
    """PIL images or uint8 (C, H, W) tensors (one, a list, or a (B, C, H, W) batch) -> pixels (B, 3, size, size),
    as transformers' CLIPImageProcessor (torchvision) prepares them; size is the model's image_size.

        colour   greyscale repeated to RGB, transparency composited onto white
        resize   the shorter side to `size`, the longer to int(size * long / short): bicubic with
                 antialiasing, rounded back to uint8
        crop     the centred size x size square (its offset rounded down)
        scale    to [0, 1], then (v - CLIP_MEAN) / CLIP_STD per channel

    OpenAI's `clip` package resizes with PIL's bicubic filter, which moves a few pixel values by a grey
    level or two, and rounds the crop offset to the nearest integer (a one-pixel shift for some sizes)."""
    if isinstance(images, (Image.Image, torch.Tensor)):
        images = [images] if isinstance(images, Image.Image) or images.dim() == 3 else list(images)
    x = torch.stack([resize_and_crop(_rgb(image), size) for image in images]).float() / 255  # (B, 3, size, size)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
