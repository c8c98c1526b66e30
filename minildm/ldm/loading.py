"""load_stable_diffusion: any SD v1 file (original layout, diffusers folder, minildm checkpoint) to a
LatentDiffusion, every problem a one-line CheckpointError; and finding the newest training run."""
from __future__ import annotations

import dataclasses
import glob
import os
import warnings

import torch

from .. import convert
from ..clip_text import CLIPTextConfig, CLIPTextModel
from ..schedule import NoiseSchedule
from ..tokenizer import CLIPTokenizer
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .model import LatentDiffusion


def _build(name, cls, cfg, state, dtype, device):
    """A model with no memory behind its parameters, then the checkpoint's tensors assigned into it."""
    with convert.empty_parameters():
        model = cls(cfg)
    return convert.load_module(name, model, state, dtype=dtype, device=device).eval()


def _check_schedule(schedule, buffers):
    """Warn when the file's alphas_cumprod disagrees with the schedule we sample with."""
    stored = buffers.get("alphas_cumprod")
    if stored is not None and stored.shape == schedule.alphas_cumprod.shape:
        diff = (stored.float() - schedule.alphas_cumprod).abs().max().item()
        if diff > max(1e-5, 2 * torch.finfo(stored.dtype).eps):  # float16 files round it
            warnings.warn(f"the checkpoint's alphas_cumprod differ from the schedule by up to {diff:.2g}; "
                          "sampling uses the standard SD v1 schedule", stacklevel=3)


def load_stable_diffusion(path, device="cpu", dtype=torch.float32, use_ema: bool = True, *,
                          unet_config: UNetConfig | None = None, vae_config: VAEConfig | None = None,
                          text_config: CLIPTextConfig | None = None,
                          tokenizer: CLIPTokenizer | None = None, config=None) -> LatentDiffusion:
    """A LatentDiffusion from SD v1 weights or a minildm checkpoint.

    path: an original `.safetensors`/`.ckpt` (CompVis layout, EMA weights used when present and
    `use_ema`), a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ with their config.json; or unet/
    vae/ image_encoder/ for SD image variations, whose model reads image prompts), or a
    checkpoint written by `minildm.convert.save_checkpoint` (configs read from its metadata). An original
    file's sizes are read from its tensors' shapes; what shapes cannot tell (the UNet's head count, the
    latent scale factor) is SD v1's for a model of SD v1's size, else it comes from `config`, the
    original inference YAML the model was trained with (which must agree with the weights), or from
    explicit configs. dtype: float32, float16 on CUDA, bfloat16; or a function of the UNetConfig that
    returns one, called once the sizes are known (the command lines' --dtype auto).
    Raises convert.CheckpointError when the file cannot be used, saying what it seems to be.
    """
    try:
        return _load_stable_diffusion(os.fspath(path), device, dtype, use_ema, unet_config, vae_config, text_config,
                                      tokenizer, config)
    except convert.CheckpointError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OSError, EOFError) as e:
        # A file damaged in a way no earlier check names: a config entry of the wrong type, a tensor
        # of an impossible shape. Say so in one line rather than with the traceback of where it broke.
        raise convert.CheckpointError(f"{os.fspath(path)} is damaged or not a checkpoint minildm can load "
                                      f"({type(e).__name__}: {convert.first_line(e)})") from None


def _load_stable_diffusion(path, device, dtype, use_ema, unet_config, vae_config, text_config, tokenizer, config):
    device = torch.device(device)
    schedule = image_encoder = None
    if os.path.isdir(path):
        ckpt, configs = convert.read_diffusers_folder(path)
        unet_config, vae_config, text_config = configs["unet"], configs["vae"], configs["text_encoder"]
        schedule = configs["schedule"]
        scale_factor = configs["scale_factor"]
        if tokenizer is None and configs["tokenizer"]:
            tokenizer = CLIPTokenizer.from_folder(configs["tokenizer"])
        image_encoder = configs["image_encoder"]
    else:
        ckpt = convert.read_checkpoint(path)
        meta = ckpt.meta or {}
        if ckpt.kind == "vae" or ckpt.unet is None:
            raise convert.CheckpointError(f"{path} is {convert.describe('vae')}")
        if ckpt.text_encoder is None:
            raise convert.CheckpointError(f"{path} has no text encoder weights "
                                          "(cond_stage_model.transformer.*), so prompts cannot be encoded")
        no_vae = f"{path} has no VAE weights (first_stage_model.*) to decode latents"
        if ckpt.vae is None:
            raise convert.CheckpointError(no_vae)
        if meta:
            unet_config = unet_config or UNetConfig.from_dict(meta["unet"])
            vae_config = vae_config or (VAEConfig.from_dict(meta["vae"]) if meta.get("vae") else None)
            text_config = text_config or CLIPTextConfig.from_dict(meta["text_encoder"])
            if meta.get("schedule"):
                schedule = NoiseSchedule.from_dict(meta["schedule"])
            scale_factor = meta.get("scale_factor")
            if meta.get("prediction", "eps") != "eps":
                raise convert.CheckpointError(f"{path} predicts {meta['prediction']}; only eps is supported")
        else:
            unet_config, vae_config, text_config, scale_factor, schedule = _original_configs(
                path, ckpt, use_ema, config, unet_config, vae_config, text_config)
        if vae_config is None:  # a minildm file saved without its VAE's config
            raise convert.CheckpointError(no_vae)
        schedule = schedule or NoiseSchedule.sd()
        _check_schedule(schedule, ckpt.buffers)

    if callable(dtype):
        dtype = dtype(unet_config)
    unet = _build("UNet", UNet, unet_config, ckpt.unet_state(use_ema), dtype, device)
    vae = _build("VAE", AutoencoderKL, vae_config, ckpt.vae, dtype, device)
    if image_encoder is not None:  # image variations: a CLIP image embedding is the context
        return _image_variations(path, unet, vae, image_encoder, schedule, scale_factor, dtype, device)
    text_encoder = _build("text encoder", CLIPTextModel, text_config, ckpt.text_encoder_state(use_ema), dtype, device)
    if tokenizer is None:
        tokenizer = CLIPTokenizer.default(context_length=text_config.context_length)
    if scale_factor is None:
        scale_factor = vae_config.scale_factor
    return LatentDiffusion(unet, vae, text_encoder, tokenizer, schedule, scale_factor)


def _image_variations(path, unet, vae, image_encoder, schedule, scale_factor, dtype, device):
    """An image-variations LatentDiffusion: the UNet cross-attends to the image encoder's projection."""
    from ..clip_vision import load_clip  # torchvision's transforms, imported only when needed

    encoder = load_clip(image_encoder, device=device, dtype=dtype)
    if encoder.text_model is not None:
        raise convert.CheckpointError(f"{image_encoder} holds a whole CLIP (both towers); an image-variations "
                                      "folder's image_encoder/ is the image tower with its projection alone")
    width = encoder.visual_projection.out_features
    if width != unet.cfg.context_dim:
        raise convert.CheckpointError(f"{path}'s image encoder projects to {width} wide but its UNet reads "
                                      f"{unet.cfg.context_dim}-wide contexts")
    return LatentDiffusion(unet, vae, None, None, schedule, scale_factor, image_encoder=encoder)


def _original_configs(path, ckpt, use_ema, config, unet_config, vae_config, text_config):
    """(unet, vae, text configs, scale factor, schedule) of an original-layout file without minildm's
    metadata: its tensors' shapes, SD v1's values for what shapes cannot tell when it has SD v1's size,
    else the inference YAML `config`; explicit configs win. A disagreement is a one-line error."""
    try:
        shapes = {"UNet": convert.unet_shapes(ckpt.unet_state(use_ema)), "VAE": convert.vae_shapes(ckpt.vae),
                  "text": convert.text_shapes(ckpt.text_encoder_state(use_ema))}
    except (KeyError, IndexError, ValueError, AttributeError):  # tensors missing: let strict loading name them
        return (unet_config or UNetConfig.sd15(), vae_config or VAEConfig.sd(),
                text_config or CLIPTextConfig.vit_l14(), None, None)
    yaml = convert.read_inference_yaml(config) if config else None
    if yaml:
        convert.check_against_yaml("UNet", shapes["UNet"], yaml["unet"], path, config)
        convert.check_against_yaml("VAE", shapes["VAE"], yaml["vae"], path, config)
    sd_unet, sd_vae, sd_text = UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.vit_l14()
    if unet_config is None:
        fields = {k: v for k, v in shapes["UNet"].items() if v is not None}
        sd_like = dataclasses.replace(sd_unet, in_channels=fields["in_channels"])  # 9: the inpainting model
        if yaml:
            unet_config = UNetConfig(**fields, num_heads=yaml["unet"]["num_heads"])
        elif dataclasses.replace(sd_like, **fields) == sd_like:
            unet_config = sd_like                                          # SD v1's sizes: its 8 heads
        else:
            raise convert.CheckpointError(
                f"{path} holds a UNet of another size than SD v1's (width {fields['model_channels']}, levels "
                f"{fields['channel_mult']}); its number of attention heads cannot be read from the weights: give "
                "the inference YAML it was made with (--config FILE.yaml, or config= in load_stable_diffusion)")
    elif shapes["UNet"]["context_dim"] not in (None, unet_config.context_dim):
        raise convert.CheckpointError(f"{path}'s cross-attention reads {shapes['UNet']['context_dim']}-wide contexts, "
                                      f"the UNet config given says {unet_config.context_dim}")
    if text_config is None:
        text_sizes = {k: v for k, v in shapes["text"].items() if k != "num_heads"}
        text_config = sd_text if dataclasses.replace(sd_text, **text_sizes) == sd_text else CLIPTextConfig(**shapes["text"])
    if text_config.width != unet_config.context_dim:
        raise convert.CheckpointError(f"{path}'s text encoder is {text_config.width} wide but its UNet reads "
                                      f"{unet_config.context_dim}-wide contexts")
    scale_factor = None
    if vae_config is None:
        if yaml and yaml["scale_factor"] is not None:
            scale_factor = float(yaml["scale_factor"])
            vae_config = VAEConfig(**shapes["VAE"], scale_factor=scale_factor)
        elif dataclasses.replace(sd_vae, **shapes["VAE"]) == sd_vae:
            vae_config = sd_vae                                            # SD v1's VAE: its 0.18215
        else:
            raise convert.CheckpointError(
                f"{path} holds a VAE of another size than SD v1's, so its latent scale factor is unknown: give "
                "the inference YAML it was made with (--config FILE.yaml, or config= in load_stable_diffusion)")
    schedule = None
    if yaml and yaml["schedule"][1] is not None:
        schedule = NoiseSchedule.scaled_linear(*yaml["schedule"])          # the original's "linear" is in sqrt(beta)
    return unet_config, vae_config, text_config, scale_factor, schedule


def find_latest_checkpoint(runs_dir="runs") -> str | None:
    """The newest runs/<name>/model.safetensors written by `python -m minildm.train`, or None."""
    found = glob.glob(os.path.join(os.fspath(runs_dir), "*", "model.safetensors"))
    return max(found, key=os.path.getmtime) if found else None
