"""TAESD, the tiny autoencoder: a fast, approximate stand-in for the VAE in SD v1's latent space.

TAESD (github.com/madebyollin/taesd) is an encoder and a decoder distilled from Stable Diffusion's VAE
(vae.py) into 1.2M parameters each, against the VAE's 34M and 49M. It reads and writes the same latents,
so it can show the sampler's intermediate latents as pictures at almost no cost: a live preview. Its
pictures are not the VAE's (it makes fine detail up), so the final image still comes from the VAE.

Plain 3x3 convolutions (padding 1) and ReLUs, no normalisation, no attention:

    Block(a)    = ReLU(a + conv(ReLU(conv(ReLU(conv(a))))))
    encoder     conv, Blocks | halve (stride-2 conv), Blocks | ... | conv to zc channels
    decoder     soft clamp, conv, ReLU | Blocks, double (nearest), conv | ... | Blocks, conv to C channels
    soft clamp  z -> 3 tanh(z / 3): about the identity near 0, bounded by +-3

The original networks read and write images in [0, 1]; `encode` and `decode` speak [-1, 1] like the VAE.
TAESD's latents are the SD VAE's latents already multiplied by 0.18215, the UNet's scale: its diffusers
config has scaling_factor 1.0, and diffusers' pipelines divide latents by the VAE's scaling_factor
before decoding. So no scale factor belongs near this model: `decode` takes the sampler's z as it is.

Notation and shapes (B batch, C = 3 image channels, zc = 4 latent channels):

    x    image in [-1, 1]              (B, C, H, W)
    z    latent, in the UNet's scale    (B, zc, h, w),  h = ceil(H / 8), w = ceil(W / 8)
    encode(x) -> z;   decode(z) -> x (B, C, 8h, 8w), roughly in [-1, 1], not clamped

Keys. The original files taesd_encoder.pth and taesd_decoder.pth (also shipped as .safetensors) are the
state dicts of two bare nn.Sequential, so their keys are positions: the encoder's run from 0.weight
through 1.conv.0.weight (Block 1's first conv) to 14.bias; the decoder's start at 1.weight, position 0
being the clamp. `TinyAutoencoder` keeps the two Sequentials as `encoder` and `decoder`, so its keys are
the files' keys behind "encoder." and "decoder."; diffusers' AutoencoderTiny names them
encoder.layers.<i> and decoder.layers.<i - 1>.

TAESD for SDXL (taesdxl_*) has exactly these keys and shapes but SDXL's latent space, and a diffusers
config.json has no field that names the model. Nothing in the files tells the two apart: `load_taesd`
goes by the names taesd_* and cannot catch a renamed or diffusers-converted SDXL one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import (CheckpointError, _folder_weights, _read_json, add_prefix, empty_parameters, load_module,
                      read_state_dict)


@dataclass
class TAESDConfig:
    image_channels: int = 3                  # C, input and output channels
    channels: int = 64                       # width of every layer inside
    encoder_blocks: tuple = (1, 3, 3, 3)     # Blocks per resolution, full resolution first
    decoder_blocks: tuple = (3, 3, 3, 1)     # Blocks per resolution, lowest resolution first
    latent_channels: int = 4                 # zc

    def __post_init__(self):
        self.encoder_blocks, self.decoder_blocks = tuple(self.encoder_blocks), tuple(self.decoder_blocks)
        if len(self.encoder_blocks) != len(self.decoder_blocks):
            raise ValueError("the encoder and decoder need as many resolutions each")

    @property
    def downsample_factor(self) -> int:
        """How many pixels one latent cell covers along each side (8 for SD)."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @classmethod
    def sd(cls) -> "TAESDConfig":
        """SD v1's TAESD: encoder 1,222,532 parameters, decoder 1,222,531."""
        return cls()

    @classmethod
    def tiny(cls) -> "TAESDConfig":
        """For tests: 8 channels, the same layer list. Encoder 19,764 parameters, decoder 19,763."""
        return cls(channels=8)


def _conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Three convs with ReLUs between them, added to the input, then a ReLU (`conv` as in the original,
    whose 1x1 `skip` conv exists only between different widths, which TAESD never has)."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(a) + a)


class SoftClamp(nn.Module):
    """z -> 3 tanh(z / 3), so that a wild latent (early in sampling) cannot blow the decoder up."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


def make_encoder(cfg: TAESDConfig) -> nn.Sequential:
    """Image in [0, 1] (B, C, H, W) -> z (B, zc, h, w): the layer list of taesd_encoder.pth."""
    c = cfg.channels
    layers = []
    for level, num_blocks in enumerate(cfg.encoder_blocks):
        # The first level reads the image; each later one starts by halving the resolution.
        layers.append(_conv(cfg.image_channels, c) if level == 0 else _conv(c, c, stride=2, bias=False))
        layers += [Block(c) for _ in range(num_blocks)]
    layers.append(_conv(c, cfg.latent_channels))
    return nn.Sequential(*layers)


def make_decoder(cfg: TAESDConfig) -> nn.Sequential:
    """z (B, zc, h, w) -> image in about [0, 1] (B, C, 8h, 8w): the layer list of taesd_decoder.pth."""
    c = cfg.channels
    layers = [SoftClamp(), _conv(cfg.latent_channels, c), nn.ReLU()]
    for level, num_blocks in enumerate(cfg.decoder_blocks):
        layers += [Block(c) for _ in range(num_blocks)]
        if level < len(cfg.decoder_blocks) - 1:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, c, bias=False)]
    layers.append(_conv(c, cfg.image_channels))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """`encoder` and `decoder` as in the original files; `encoder` is None for a decoder-only model."""

    def __init__(self, cfg: TAESDConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg) if with_encoder else None
        self.decoder = make_decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> z (B, zc, h, w) in the UNet's scale."""
        if self.encoder is None:
            raise CheckpointError("this TAESD was loaded without taesd_encoder.pth (or .safetensors): "
                                  "it can decode latents but not encode images")
        return self.encoder((x + 1) / 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, zc, h, w) in the UNet's scale -> x (B, C, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(z) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Loading: the original files, or a diffusers AutoencoderTiny folder


# What a diffusers AutoencoderTiny config.json says for SD v1's TAESD, besides the sizes.
_SD_SETTINGS = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
                "scaling_factor": 1.0, "shift_factor": 0.0, "in_channels": 3, "out_channels": 3}


def _config_from_diffusers(d: dict, path: str) -> TAESDConfig:
    """The TAESDConfig of a diffusers AutoencoderTiny config.json, refusing what this module is not."""
    kind = d.get("_class_name")
    if kind == "AutoencoderKL":
        raise CheckpointError(f"{path} is an SD VAE (AutoencoderKL), not a TAESD")
    if kind != "AutoencoderTiny":
        raise CheckpointError(f"{path} holds a {kind or 'config without _class_name'}, not a TAESD "
                              "(diffusers AutoencoderTiny)")
    if d.get("latent_channels", 4) != 4:
        raise CheckpointError(f"{path} has {d['latent_channels']} latent channels: a tiny autoencoder for "
                              "another model (SD3 and FLUX.1 have 16); SD v1's latents have 4")
    widths = set(d.get("encoder_block_out_channels", [64]) + d.get("decoder_block_out_channels", [64]))
    differs = [f"{k} {d[k]}" for k, v in _SD_SETTINGS.items() if k in d and d[k] != v]
    differs += [f"block widths {sorted(widths)}"] if len(widths) != 1 else []
    if differs:
        raise CheckpointError(f"{path} is not SD v1's TAESD: {', '.join(differs)}")
    return TAESDConfig(channels=widths.pop(), encoder_blocks=d.get("num_encoder_blocks", (1, 3, 3, 3)),
                       decoder_blocks=d.get("num_decoder_blocks", (3, 3, 3, 1)))


def _from_diffusers(state: dict) -> dict:
    """encoder.layers.<i>.* -> encoder.<i>.*, decoder.layers.<i>.* -> decoder.<i + 1>.*; other keys
    are kept as they are, for the strict check to name."""
    out = {}
    for key, v in state.items():
        part, layers, i, rest = (key.split(".", 3) + ["", "", ""])[:4]
        if part in ("encoder", "decoder") and layers == "layers" and i.isdigit() and rest:
            # Diffusers' decoder applies the clamp in forward, so it has no layer for position 0.
            key = f"{part}.{int(i) + (part == 'decoder')}.{rest}"
        out[key] = v
    return out


def _find(folder: str, stem: str) -> str | None:
    """folder/stem.safetensors, else folder/stem.pth, else None."""
    for ext in (".safetensors", ".pth"):
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    return None


def load_taesd(path, device="cpu", dtype=torch.float32, cfg: TAESDConfig | None = None) -> TinyAutoencoder:
    """A TinyAutoencoder from a folder, every problem a one-line CheckpointError. The folder holds

        taesd_decoder.pth and taesd_encoder.pth (or .safetensors), read as `cfg` (default TAESDConfig.sd(),
            since these files carry no config); without the encoder file the model only decodes, or
        config.json and diffusion_pytorch_model.safetensors (or .bin): a diffusers AutoencoderTiny.

    A folder with both (as madebyollin/taesd on the Hugging Face Hub) is read through the original files.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"TAESD folder not found: {path}" if not os.path.exists(path) else
                              f"{path} is a file; give the folder that holds taesd_decoder.pth")
    decoder = _find(path, "taesd_decoder")
    others = sorted(n for n in os.listdir(path) if n.startswith("tae") and "_decoder." in n
                    and not n.startswith("taesd_decoder."))
    if decoder is None and others:
        raise CheckpointError(f"{path} holds {others[0]}, a tiny autoencoder for another model's latents "
                              "(taesdxl: SDXL, taesd3: SD3, taef1: FLUX.1); SD v1 needs taesd_decoder.pth")
    if decoder is not None:
        cfg = cfg or TAESDConfig.sd()
        state = add_prefix(read_state_dict(decoder)[0], "decoder.")
        encoder = _find(path, "taesd_encoder")
        if encoder is not None:
            state.update(add_prefix(read_state_dict(encoder)[0], "encoder."))
        with_encoder = encoder is not None
        zc = state["decoder.1.weight"].shape[1] if "decoder.1.weight" in state else cfg.latent_channels
        if zc != cfg.latent_channels:
            raise CheckpointError(f"{decoder} decodes {zc} latent channels, not {cfg.latent_channels}: a tiny "
                                  "autoencoder for another model (SD3 and FLUX.1 have 16)?")
    elif os.path.isfile(os.path.join(path, "config.json")):
        cfg = _config_from_diffusers(_read_json(os.path.join(path, "config.json")), path)
        state, with_encoder = _from_diffusers(_folder_weights(path)), True
    else:
        raise CheckpointError(f"{path} holds neither taesd_decoder.pth (or .safetensors) nor the "
                              "config.json of a diffusers AutoencoderTiny folder")
    with empty_parameters():
        model = TinyAutoencoder(cfg, with_encoder)
    return load_module("TAESD", model, state, dtype=dtype, device=device).eval()
