"""Checkpoint layouts: the only module that knows checkpoint key names.

minildm's modules are named after the original Stable Diffusion v1 code, so a model's `state_dict()`
keys are the original checkpoint's keys with one prefix removed:

    UNet           model.diffusion_model.<key>
    AutoencoderKL  first_stage_model.<key>
    CLIPTextModel  cond_stage_model.transformer.text_model.<key>
"""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."


def add_prefix(state_dict, prefix):
    """Keys of a module's state dict as they are stored in an original checkpoint."""
    return {prefix + k: v for k, v in state_dict.items()}


def strip_prefix(state_dict, prefix):
    """The entries of an original checkpoint under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
