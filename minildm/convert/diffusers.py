"""diffusers folders: rename maps built from a config by short loops, configs both ways, reading a folder."""
from __future__ import annotations

import json
import os


from .keys import POSITION_IDS, CheckpointError, add_prefix, strip_prefix, describe
from .files import first_line, read_state_dict
from .original import Checkpoint, summarise_keys


# ----------------------------------------------------------------------------------------------------
# diffusers folders: rename maps built from the config


_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _attention_at(levels, level, num_levels):
    """Whether UNet level `level` has attention, for configs holding level indices or one bool per level."""
    levels = list(levels)
    if len(levels) == num_levels and all(isinstance(x, bool) for x in levels):
        return levels[level]
    return level in levels


def unet_module_map(cfg):
    """[(original module, diffusers module, renames inside it)] for a UNetConfig."""
    n_levels, n_res = len(cfg.channel_mult), cfg.num_res_blocks
    pairs = [("time_embed.0", "time_embedding.linear_1", None), ("time_embed.2", "time_embedding.linear_2", None),
             ("input_blocks.0.0", "conv_in", None), ("out.0", "conv_norm_out", None), ("out.2", "conv_out", None),
             ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
             ("middle_block.1", "mid_block.attentions.0", None),
             ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)]
    if cfg.guidance_embed_dim is not None:  # LCM-distilled: no original-layout name exists, minildm's is its own
        pairs.append(("guidance_embed", "time_embedding.cond_proj", None))
    if cfg.pooled_context:  # the small presets' pooled caption: diffusers' "simple_projection" class embedding,
        pairs.append(("context_emb", "class_embedding", None))   # one Linear added to the time embedding
    for level in range(n_levels):
        attn = _attention_at(cfg.attention_levels, level, n_levels)
        for j in range(n_res):
            n = 1 + level * (n_res + 1) + j
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if attn:
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", None))
        if level < n_levels - 1:
            n = 1 + level * (n_res + 1) + n_res
            pairs.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", None))
    for i in range(n_levels):  # diffusers counts up blocks from the bottom of the UNet
        attn = _attention_at(cfg.attention_levels, n_levels - 1 - i, n_levels)
        for j in range(n_res + 1):
            n = i * (n_res + 1) + j
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attn:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", None))
        if i < n_levels - 1:
            n = i * (n_res + 1) + n_res
            pairs.append((f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", None))
    return pairs


def vae_module_map(cfg):
    """[(original module, diffusers module, renames inside it)] for a VAEConfig."""
    n_levels, n_res = len(cfg.channel_mult), cfg.num_res_blocks
    pairs = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.conv_out", f"{part}.conv_out", None),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", None),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)]
    for level in range(n_levels):
        for j in range(n_res):
            pairs.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", _VAE_RESNET))
        up = n_levels - 1 - level  # the decoder's up.0 is its last (highest-resolution) level
        for j in range(n_res + 1):
            pairs.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET))
        if level < n_levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", None))
        if level > 0:
            pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", None))
    return pairs


def _rename(state, pairs, to_diffusers, name):
    """Rename every key of `state` through the module map, strictly: each key used once, no collisions."""
    if to_diffusers:
        table = {src: (dst, renames or {}) for src, dst, renames in pairs}
    else:
        table = {dst: (src, {v: k for k, v in (renames or {}).items()}) for src, dst, renames in pairs}
    out, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            head = ".".join(parts[:cut])
            if head in table:
                target, renames = table[head]
                rest = ".".join(parts[cut:])
                for inner in sorted(renames, key=len, reverse=True):
                    if rest.startswith(inner + "."):
                        rest = renames[inner] + rest[len(inner):]
                        break
                new = f"{target}.{rest}"
                break
        else:
            unknown.append(key)
            continue
        if new in out:
            raise CheckpointError(f"two {name} keys map to {new}")
        out[new] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} {name} keys have no counterpart: {summarise_keys(unknown)} "
                              f"(e.g. {unknown[0]})")
    return out


def _is_vae_attn_matrix(key):
    return ".mid.attn_1." in key and key.endswith("weight") and not key.endswith("norm.weight")


def unet_to_diffusers(state, cfg):
    """A minildm/original UNet state dict renamed to diffusers' UNet2DConditionModel."""
    return _rename(state, unet_module_map(cfg), True, "UNet")


def unet_from_diffusers(state, cfg):
    """A diffusers UNet2DConditionModel state dict renamed to the original layout."""
    return _rename(state, unet_module_map(cfg), False, "UNet")


def vae_to_diffusers(state, cfg):
    """A minildm/original VAE state dict renamed (and its 1x1-conv attention reshaped) for diffusers."""
    out = {}
    for k, v in state.items():
        out[k] = v.flatten(1) if _is_vae_attn_matrix(k) else v
    return _rename(out, vae_module_map(cfg), True, "VAE")


def vae_from_diffusers(state, cfg):
    """A diffusers AutoencoderKL state dict in the original layout (attention as 1x1 convolutions)."""
    fixed = {}
    for k, v in state.items():
        for old, new in _OLD_VAE_ATTN.items():  # folders saved by diffusers < 0.14
            if f".attentions.0.{old}." in k:
                k = k.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
        fixed[k] = v
    out = _rename(fixed, vae_module_map(cfg), False, "VAE")
    return {k: (v[:, :, None, None] if _is_vae_attn_matrix(k) and v.dim() == 2 else v) for k, v in out.items()}


def text_to_diffusers(state):
    """A minildm/original CLIP text state dict as transformers' CLIPTextModel keys."""
    return add_prefix(state, "text_model.")


def text_from_diffusers(state):
    """transformers' CLIPTextModel keys in the original layout (the position_ids buffer dropped).

    Folders saved with transformers 4 (all released SD v1 folders) put every key under "text_model.";
    transformers 5 saves them without that prefix. Both are accepted.
    """
    if any(k.startswith("text_model.") for k in state):
        unknown = [k for k in state if not k.startswith("text_model.")]
        if unknown:
            raise CheckpointError(f"{len(unknown)} text encoder keys are not under text_model.: "
                                  f"{summarise_keys(unknown)}")
        state = strip_prefix(state, "text_model.")
    out = dict(state)
    out.pop(POSITION_IDS, None)
    return out


# Configs: diffusers' config.json <-> minildm's dataclasses


def unet_config_from_diffusers(d):
    """A UNetConfig from a diffusers unet/config.json dict (SD v1 family only)."""
    from ..unet import UNetConfig

    if d.get("use_linear_projection") or d.get("cross_attention_dim") == 1024:
        raise CheckpointError(f"this folder is {describe('sd2')}")
    if d.get("addition_embed_type") or d.get("transformer_layers_per_block", 1) not in (1, [1] * 4, None):
        raise CheckpointError(f"this folder is {describe('sdxl')}")
    blocks = list(d["block_out_channels"])
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # SD v1 stores heads here
    if isinstance(heads, (list, tuple)):
        heads = heads[0]
    base = UNetConfig.tiny().to_dict()
    base.update(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
                model_channels=blocks[0], channel_mult=[c // blocks[0] for c in blocks],
                num_res_blocks=d.get("layers_per_block", 2),
                attention_levels=_levels_like(base["attention_levels"], [
                    i for i, t in enumerate(d["down_block_types"]) if "CrossAttn" in t], len(blocks)),
                num_heads=heads, transformer_depth=1, context_dim=d.get("cross_attention_dim", 768),
                norm_groups=d.get("norm_num_groups", 32), guidance_embed_dim=d.get("time_cond_proj_dim"),
                pooled_context=d.get("class_embed_type") == "simple_projection")
    return UNetConfig.from_dict(base)


def _levels_like(example, indices, n_levels):
    """Attention levels in the same form as the UNetConfig uses (level indices or one bool per level)."""
    example = list(example)
    if example and all(isinstance(x, bool) for x in example):
        return [i in indices for i in range(n_levels)]
    return list(indices)


def unet_config_to_diffusers(cfg):
    """The diffusers UNet2DConditionModel config of a UNetConfig (for tests and folder export)."""
    n = len(cfg.channel_mult)
    attn = [_attention_at(cfg.attention_levels, i, n) for i in range(n)]
    return dict(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
        use_linear_projection=False, time_cond_proj_dim=cfg.guidance_embed_dim,
        # pooled_context: diffusers runs the same layer when called with class_labels=context[:, -1]
        class_embed_type="simple_projection" if cfg.pooled_context else None,
        projection_class_embeddings_input_dim=cfg.context_dim if cfg.pooled_context else None)


def vae_config_from_diffusers(d):
    """A VAEConfig from a diffusers vae/config.json dict."""
    from ..vae import VAEConfig

    blocks = list(d["block_out_channels"])
    base = VAEConfig.tiny().to_dict()
    base.update(in_channels=d.get("in_channels", 3), base_channels=blocks[0],
                channel_mult=[c // blocks[0] for c in blocks], num_res_blocks=d.get("layers_per_block", 2),
                z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
                scale_factor=d.get("scaling_factor", 0.18215))
    if "out_channels" in base:
        base["out_channels"] = d.get("out_channels", 3)
    return VAEConfig.from_dict(base)


def vae_config_to_diffusers(cfg):
    """The diffusers AutoencoderKL config of a VAEConfig."""
    n = len(cfg.channel_mult)
    return dict(in_channels=cfg.in_channels, out_channels=getattr(cfg, "out_channels", cfg.in_channels),
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
                layers_per_block=cfg.num_res_blocks, act_fn="silu", latent_channels=cfg.z_channels,
                norm_num_groups=cfg.norm_groups, sample_size=256, scaling_factor=cfg.scale_factor)


def text_config_from_diffusers(d):
    """A CLIPTextConfig from a transformers text_encoder/config.json dict."""
    from ..clip_text import CLIPTextConfig

    if d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"this text encoder uses {d.get('hidden_act')}, not SD v1's quick_gelu; "
                              f"the folder is probably {describe('sd2')}")
    base = CLIPTextConfig.tiny().to_dict()
    base.update(vocab_size=d["vocab_size"], context_length=d.get("max_position_embeddings", 77),
                width=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                mlp_width=d["intermediate_size"])
    return CLIPTextConfig.from_dict(base)


def text_config_to_diffusers(cfg):
    """The transformers CLIPTextConfig arguments of a CLIPTextConfig."""
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, hidden_size=cfg.width,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.mlp_width, hidden_act="quick_gelu", projection_dim=cfg.width,
                layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def schedule_from_diffusers(d):
    """The NoiseSchedule a diffusers scheduler_config.json describes (None without a config or for
    another kind of schedule: the model then samples with SD v1's).
    "scaled_linear" is linear in sqrt(beta), SD v1's; "linear" is DDPM's."""
    from ..schedule import NoiseSchedule

    if d is None:
        return None
    if d.get("beta_schedule", "scaled_linear") == "scaled_linear":
        return NoiseSchedule.scaled_linear(d.get("num_train_timesteps", 1000), d.get("beta_start", 0.00085),
                                           d.get("beta_end", 0.012))
    if d.get("beta_schedule") == "linear":
        return NoiseSchedule.linear(d.get("num_train_timesteps", 1000), d.get("beta_start", 0.0001),
                                    d.get("beta_end", 0.02))
    return None                                                   # another kind: sample with SD v1's


def _folder_weights(folder):
    """The state dict in a diffusers component folder (safetensors preferred, .bin via weights-only)."""
    names = sorted(os.listdir(folder))
    for pick in (lambda n: n.endswith(".safetensors") and "fp16" not in n, lambda n: n.endswith(".safetensors"),
                 lambda n: n.endswith(".bin") and "fp16" not in n, lambda n: n.endswith(".bin")):
        files = [n for n in names if pick(n) and not n.endswith(".index.json")]
        if files:
            state = {}
            for n in files:  # sharded weights come in several files
                state.update(read_state_dict(os.path.join(folder, n))[0])
            return state
    raise CheckpointError(f"no weights (.safetensors or .bin) in {folder}")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a diffusers folder needs a config.json in each part") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({first_line(e)})") from None


def read_diffusers_folder(path):
    """(Checkpoint in the original layout, configs) from a diffusers folder.

    configs holds "unet", "vae", "text_encoder" (minildm config objects), "schedule" (the NoiseSchedule
    of its scheduler config, or None without one), "tokenizer" (the tokenizer folder or None) and
    "image_encoder": None, or for an image-variations folder (StableDiffusionImageVariationPipeline:
    image_encoder/ and no text_encoder/) that folder, which clip_vision.load_clip reads; its
    text_encoder config and weights are then None.
    """
    path = os.fspath(path)
    image_encoder = os.path.join(path, "image_encoder")
    variations = os.path.isdir(image_encoder) and not os.path.isdir(os.path.join(path, "text_encoder"))
    for part in ("unet", "vae") if variations else ("unet", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(path, part)):
            raise CheckpointError(f"{path} is not a diffusers folder: it has no {part}/ subfolder")
    unet_cfg = unet_config_from_diffusers(_read_json(os.path.join(path, "unet", "config.json")))
    vae_json = _read_json(os.path.join(path, "vae", "config.json"))
    vae_cfg = vae_config_from_diffusers(vae_json)
    text_cfg = None if variations else text_config_from_diffusers(
        _read_json(os.path.join(path, "text_encoder", "config.json")))
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_file) if os.path.exists(sched_file) else None
    if sched and sched.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path} predicts {sched['prediction_type']} (an SD 2.x model?); minildm "
                              "implements SD v1's epsilon prediction")
    tok = os.path.join(path, "tokenizer")
    ckpt = Checkpoint(
        kind="diffusers",
        unet=unet_from_diffusers(_folder_weights(os.path.join(path, "unet")), unet_cfg),
        vae=vae_from_diffusers(_folder_weights(os.path.join(path, "vae")), vae_cfg),
        text_encoder=None if variations else text_from_diffusers(_folder_weights(os.path.join(path, "text_encoder"))))
    configs = {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg, "schedule": schedule_from_diffusers(sched),
               "scale_factor": vae_json.get("scaling_factor", 0.18215),
               "tokenizer": tok if os.path.isdir(tok) and not variations else None,
               "image_encoder": image_encoder if variations else None}
    return ckpt, configs
