"""Checkpoint layouts: the only package that knows checkpoint key names.

minildm's modules are named after the original Stable Diffusion v1 code, so a model's `state_dict()`
keys are the original checkpoint's keys with one prefix removed:

    UNet           model.diffusion_model.<key>
    AutoencoderKL  first_stage_model.<key>
    CLIPTextModel  cond_stage_model.transformer.text_model.<key>

This module reads and writes three layouts (and reads a fourth) and recognises the files it cannot use:

    original   one flat dict with the prefixes above (a CompVis `.ckpt` or `.safetensors`), maybe with
               EMA copies of the UNet under model_ema.<key without "model." and without dots>, and
               buffers of the training code (alphas_cumprod, position_ids, model_ema.decay, ...)
    diffusers  a folder unet/ vae/ text_encoder/ tokenizer/ scheduler/, each with a config.json and
               weights whose module names differ; the rename map is built from the config by short loops
    minildm    the original layout in a `.safetensors` file whose metadata entry "minildm" holds the
               configs, so the file is loadable without guessing (written by `save_checkpoint`); a
               text encoder trained with the UNet may have its EMA copy under cond_stage_model_ema.
    CLIP       a transformers CLIP folder (config.json, model.safetensors) for clip_vision.CLIPModel,
               whose module names are transformers' own: only the configs are translated

Loading is strict: every source key is used once, every target is filled, shapes are equal, and a
file that is not Stable Diffusion v1 (SD 2.x, SDXL, a LoRA, a VAE-only file, a truncated download) is
named in the error instead of being half loaded. `.ckpt` files are unpickled only by PyTorch's
weights-only loader, so a pickle that wants to run code is refused before any of it runs.

In files, in the order to read them: keys.py (prefixes, what a state dict is, CheckpointError),
files.py (reading bytes safely), original.py (the original layout, strict loading, minildm's own
files), diffusers.py (rename maps and configs for diffusers folders), clip.py (transformers' CLIP folders).
"""

from .keys import (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX, TEXT_EMA_PREFIX, PREFIXES,
                   FORMAT_VERSION, METADATA_KEY, SCHEDULE_BUFFERS, POSITION_IDS, CheckpointError, add_prefix,
                   strip_prefix, ema_key, identify, KIND_NAMES, describe)  # noqa: F401
from .files import (_safetensors_header, read_safetensors, first_line, _last_line, read_ckpt, load_pickle,
                    read_textual_inversion, FILE_SIGNATURES, sniff, read_state_dict)  # noqa: F401
from .original import (Checkpoint, _group, summarise_keys, split_original, merge_original, read_checkpoint,
                       _count, unet_shapes, vae_shapes, text_shapes, read_inference_yaml, check_against_yaml,
                       check_state_dict, empty_parameters, load_module, _config_dict, save_checkpoint,
                       load_checkpoint)  # noqa: F401
from .diffusers import (_UNET_RESNET, _VAE_RESNET, _VAE_ATTN, _OLD_VAE_ATTN, _attention_at, unet_module_map,
                        vae_module_map, _rename, _is_vae_attn_matrix, unet_to_diffusers, unet_from_diffusers,
                        vae_to_diffusers, vae_from_diffusers, text_to_diffusers, text_from_diffusers,
                        unet_config_from_diffusers, _levels_like, unet_config_to_diffusers,
                        vae_config_from_diffusers, vae_config_to_diffusers, text_config_from_diffusers,
                        text_config_to_diffusers, _folder_weights, _read_json, read_diffusers_folder)  # noqa: F401
from .clip import (vision_config_from_transformers, text_config_from_transformers, read_clip_folder)  # noqa: F401
