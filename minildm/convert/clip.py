"""transformers' CLIP folders (openai/clip-vit-large-patch14; the image_encoder/ of SD image variations):
config.json to minildm's configs, the weights to a state dict for clip_vision.CLIPModel.

clip_vision.CLIPModel is named like transformers' CLIPModel (and, without its text tower, like
CLIPVisionModelWithProjection), so no key is renamed: only the embeddings.position_ids buffers that
older files carry are dropped, as they are for the text encoder alone.
"""
from __future__ import annotations

import dataclasses
import os

from .keys import POSITION_IDS, CheckpointError
from .diffusers import _folder_weights, _read_json, text_config_from_diffusers

# transformers may leave out of a saved config.json the fields equal to its defaults (ViT-B/32's).
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, layer_norm_eps=1e-5, projection_dim=512,
                        hidden_act="quick_gelu")
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_PROJECTION_DEFAULT = 512


def _check_activation(d, tower):
    if d["hidden_act"] != "quick_gelu":
        raise CheckpointError(f"this CLIP's {tower} tower uses {d['hidden_act']}, not OpenAI's quick_gelu: it is "
                              "probably an OpenCLIP model (ViT-H/14, the text encoder of SD 2.x), which minildm "
                              "does not implement")


def vision_config_from_transformers(d, projection_dim=None):
    """A CLIPVisionConfig from transformers' CLIPVisionConfig dict (projection_dim: CLIPConfig's, if given)."""
    from ..clip_vision import CLIPVisionConfig

    d = {**_VISION_DEFAULTS, **d}
    _check_activation(d, "image")
    return CLIPVisionConfig(image_size=d["image_size"], patch_size=d["patch_size"], in_channels=d["num_channels"],
                            width=d["hidden_size"], num_layers=d["num_hidden_layers"],
                            num_heads=d["num_attention_heads"], mlp_width=d["intermediate_size"],
                            layer_norm_eps=d["layer_norm_eps"], projection_dim=projection_dim or d["projection_dim"])


def text_config_from_transformers(d):
    """A CLIPTextConfig from transformers' CLIPTextConfig dict (the text_config of a CLIPConfig)."""
    d = {**_TEXT_DEFAULTS, **d}
    _check_activation(d, "text")
    return dataclasses.replace(text_config_from_diffusers(d), layer_norm_eps=d["layer_norm_eps"])


def read_clip_folder(path):
    """(state dict, CLIPVisionConfig, CLIPTextConfig or None) from a transformers CLIPModel folder or a
    CLIPVisionModelWithProjection folder; a diffusers pipeline folder is read from its image_encoder/."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "image_encoder")):
        path = os.path.join(path, "image_encoder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} is not a transformers CLIP folder: it has no config.json")
    d = _read_json(os.path.join(path, "config.json"))
    kind = d.get("model_type")
    if kind == "clip":  # older files repeat the sizes in *_config_dict, which transformers reads last
        text = text_config_from_transformers({**d.get("text_config", {}), **(d.get("text_config_dict") or {})})
        vision = vision_config_from_transformers({**d.get("vision_config", {}), **(d.get("vision_config_dict") or {})},
                                                 d.get("projection_dim", _PROJECTION_DEFAULT))
    elif kind == "clip_vision_model":
        text, vision = None, vision_config_from_transformers(d)
    elif kind == "clip_text_model":
        raise CheckpointError(f"{path} holds a CLIP text encoder alone (like an SD pipeline's text_encoder/, "
                              "which load_stable_diffusion reads); load_clip needs the image tower too")
    else:
        raise CheckpointError(f"{path}/config.json describes a {kind!r} model, not transformers' CLIP")
    state = _folder_weights(path)
    for tower in ("text_model.", "vision_model."):
        state.pop(tower + POSITION_IDS, None)  # a buffer of older transformers, 0..n-1
    if not any(k.startswith("vision_model.") for k in state):
        raise CheckpointError(f"{path} has no vision_model.* weights (its first key is {next(iter(state), None)}): "
                              "it is not in transformers' CLIP layout")
    return state, vision, text
