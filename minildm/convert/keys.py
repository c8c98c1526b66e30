"""What keys say: the original layout's prefixes, the tensors that are not weights, what kind of model a
state dict holds, and the one error of the package."""
from __future__ import annotations

import re


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
EMA_PREFIX = "model_ema."
TEXT_EMA_PREFIX = "cond_stage_model_ema.transformer.text_model."  # minildm's own: the original trains no text encoder
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

FORMAT_VERSION = 1
METADATA_KEY = "minildm"

# Tensors of the original training code that are not model weights. They are never a reason to fail:
# the noise schedule ones are compared with ours by the loader, the rest are dropped.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay", "model_ema.num_updates",
)
POSITION_IDS = "embeddings.position_ids"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in words a user can act on.

    Messages quote key names read from the file, and a damaged file's keys may hold any character: control
    characters (a newline in a key) are shown escaped, so the message stays one line."""

    def __init__(self, message: str = ""):
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(message)))


def add_prefix(state_dict, prefix):
    """Keys of a module's state dict as they are stored in an original checkpoint."""
    return {prefix + k: v for k, v in state_dict.items()}


def strip_prefix(state_dict, prefix):
    """The entries of an original checkpoint under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def ema_key(unet_key):
    """The original EMA name of a UNet weight: input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


# ----------------------------------------------------------------------------------------------------
# Recognising what a file is


def identify(state, metadata=None):
    """A short name for what a flat state dict holds: "minildm", "sd1", "sd2", "sdxl", "lora",
    "vae", "diffusers", or "unknown"."""
    keys = list(state)
    if metadata and METADATA_KEY in metadata:
        return "minildm"
    if any(k.startswith("lora_") or ".lora_" in k or "lora_A" in k or "lora_B" in k for k in keys):
        return "lora"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    to_k = next((v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and to_k.shape[-1] == 1024:
        return "sd2"
    if any(k.startswith(UNET_PREFIX) or k.startswith(EMA_PREFIX) for k in keys):
        return "sd1"
    bare_vae = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")
    if keys and (all(k.startswith(VAE_PREFIX) for k in keys) or all(k.startswith(bare_vae) for k in keys)):
        return "vae"
    if any(k.startswith(("down_blocks.", "text_model.")) for k in keys):
        return "diffusers"
    return "unknown"


KIND_NAMES = {
    "sd2": "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder with a 1024-wide context, "
           "often v-prediction); minildm implements SD v1",
    "sdxl": "an SDXL checkpoint (conditioner.embedders.*, two text encoders); minildm implements SD v1",
    "lora": "a LoRA (lora_* weight deltas), not a full model; it needs the base model it was trained on "
            "(python -m minildm.sample --ckpt BASE --lora FILE)",
    "vae": "a VAE-only file (only autoencoder weights); it has no UNet or text encoder to sample with",
    "diffusers": "one component of a diffusers folder; point at the folder that holds unet/, vae/, "
                 "text_encoder/ and tokenizer/",
    "unknown": "not a Stable Diffusion checkpoint minildm recognises",
}


def describe(kind):
    """The words used in error messages for a checkpoint kind."""
    return KIND_NAMES.get(kind, kind)
