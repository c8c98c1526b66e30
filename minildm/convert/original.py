"""The original layout: splitting it into per-module state dicts and back, the sizes its shapes and its
inference YAML say, strict loading into a model, and minildm's own checkpoints."""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from .keys import (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX, TEXT_EMA_PREFIX, PREFIXES,
                   FORMAT_VERSION, METADATA_KEY, SCHEDULE_BUFFERS, POSITION_IDS, CheckpointError, add_prefix,
                   strip_prefix, ema_key, identify, describe)
from .files import first_line, read_state_dict


# ----------------------------------------------------------------------------------------------------
# Original layout <-> per-module state dicts


@dataclass
class Checkpoint:
    """The contents of a checkpoint, split per module (keys without prefix, tensors as stored)."""

    kind: str
    unet: dict | None = None
    ema_unet: dict | None = None
    vae: dict | None = None
    text_encoder: dict | None = None
    ema_text_encoder: dict | None = None
    buffers: dict = field(default_factory=dict)  # alphas_cumprod and friends, for checking
    meta: dict | None = None  # minildm's metadata (configs), when the file has it

    def unet_state(self, use_ema=True):
        """The UNet weights to sample with: the EMA copy when there is one and `use_ema`."""
        return self.ema_unet if (use_ema and self.ema_unet is not None) else self.unet

    def text_encoder_state(self, use_ema=True):
        """The text encoder's weights: its EMA copy when it was trained with the UNet and `use_ema`."""
        return self.ema_text_encoder if (use_ema and self.ema_text_encoder is not None) else self.text_encoder


def _group(key):
    """The module a key belongs to, for grouped messages: input_blocks.4.1.norm.weight -> input_blocks.4."""
    parts = key.split(".")
    depth = 2 if len(parts) > 2 and parts[1].isdigit() else 1
    if parts[0] in ("model", "cond_stage_model", "first_stage_model"):
        depth = {"model": 3, "cond_stage_model": 4, "first_stage_model": 2}[parts[0]]
        depth += 1 if len(parts) > depth and parts[depth].isdigit() else 0
    if parts[0] in ("text_model", "vision_model"):  # transformers' CLIP: vision_model.encoder.layers.3
        depth = 4 if parts[1:3] == ["encoder", "layers"] else 2
    return ".".join(parts[:depth])


def summarise_keys(keys, limit=8):
    """'input_blocks.1 (14), out (4), ...' : key counts grouped by module, for error messages."""
    counts = Counter(_group(k) for k in keys)
    items = [f"{g} ({n})" for g, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(items) + (f", and {more} more modules" if more > 0 else "")


def split_original(state, kind="sd1", meta=None):
    """Split a flat original-layout state dict into a `Checkpoint`.

    Every key must be a module weight under a known prefix, an EMA copy of a UNet weight, or one of the
    training buffers; anything else is reported (grouped by module) rather than silently dropped.
    """
    if kind not in ("sd1", "minildm", "vae"):
        raise CheckpointError(f"this file is {describe(kind)}")
    old_text = "cond_stage_model.transformer."  # some files (older transformers) lack "text_model."
    if any(k.startswith(old_text) and not k.startswith(TEXT_PREFIX) for k in state):
        state = {(TEXT_PREFIX + k[len(old_text):] if k.startswith(old_text) else k): v for k, v in state.items()}
    parts = {name: strip_prefix(state, prefix) for name, prefix in PREFIXES.items()}
    ema_text = strip_prefix(state, TEXT_EMA_PREFIX)
    if ema_text and set(ema_text) != set(parts["text_encoder"]):
        raise CheckpointError(f"the text encoder's EMA weights ({TEXT_EMA_PREFIX}*) do not match its weights")
    buffers = {k: v for k, v in state.items() if k in SCHEDULE_BUFFERS}
    parts["text_encoder"].pop(POSITION_IDS, None)  # a buffer of the old transformers CLIP model

    ema_raw = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX) and k not in buffers}
    ema = None
    if ema_raw:
        if not parts["unet"]:
            raise CheckpointError("the file has EMA weights (model_ema.*) but no model.diffusion_model.* "
                                  "weights to name them after")
        by_ema_name = {ema_key(k): k for k in parts["unet"]}
        unknown = [k for k in ema_raw if k not in by_ema_name]
        if unknown:
            raise CheckpointError(f"{len(unknown)} EMA keys match no UNet weight, e.g. {unknown[0]}")
        ema = {by_ema_name[k]: v for k, v in ema_raw.items()}
        missing = [k for k in parts["unet"] if k not in ema]
        if missing:
            raise CheckpointError(f"the EMA weights lack {len(missing)} UNet weights: {summarise_keys(missing)}")

    bare = all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")) for k in state)
    if kind == "vae" and bare:  # a stand-alone VAE file such as vae-ft-mse-840000
        parts["vae"] = {k: v for k, v in state.items() if not k.startswith("loss.")}
        used = set(state)
    else:
        used = set(buffers) | set(ema_raw) | {TEXT_PREFIX + POSITION_IDS}
        used |= {PREFIXES[name] + k for name, sd in parts.items() for k in sd}
        used |= {TEXT_EMA_PREFIX + k for k in ema_text}
    unexpected = [k for k in state if k not in used]
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} keys belong to no minildm module: "
                              f"{summarise_keys(unexpected)} (e.g. {unexpected[0]})")
    return Checkpoint(kind=kind, unet=parts["unet"] or None, ema_unet=ema, vae=parts["vae"] or None,
                      text_encoder=parts["text_encoder"] or None, ema_text_encoder=ema_text or None,
                      buffers=buffers, meta=meta)


def merge_original(unet=None, vae=None, text_encoder=None, ema_unet=None, ema_text_encoder=None):
    """One flat original-layout state dict from per-module state dicts (the inverse of `split_original`)."""
    state = {}
    for prefix, sd in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX, text_encoder),
                       (TEXT_EMA_PREFIX, ema_text_encoder)):
        state.update(add_prefix(sd or {}, prefix))
    for k, v in (ema_unet or {}).items():
        state[ema_key(k)] = v
    return state


def read_checkpoint(path, device="cpu"):
    """A `Checkpoint` from an original-layout or minildm file, or a CheckpointError naming what it is."""
    state, metadata = read_state_dict(path, device)
    kind = identify(state, metadata)
    meta = None
    if kind == "minildm":
        meta = json.loads(metadata[METADATA_KEY])
        if meta.get("format", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer minildm (format {meta['format']})")
    if kind not in ("sd1", "minildm", "vae"):
        raise CheckpointError(f"{path} is {describe(kind)}")
    return split_original(state, kind, meta)


# ----------------------------------------------------------------------------------------------------
# Sizes of an original-layout model: what its tensors' shapes say, and what its inference YAML says

def _count(state, pattern):
    """How many consecutive i from 0 make pattern.format(i) a key of state."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def unet_shapes(state) -> dict:
    """The UNetConfig fields an original-layout UNet's weights determine: all but num_heads (a head count
    leaves every shape as it is) and the normalisation groups (the original code fixes 32)."""
    model_channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
    widths, blocks, attention, level, count, i = [], [], [], 0, 0, 1
    while True:  # input_blocks 1, 2, ...: ResBlocks (maybe with a transformer), a downsampler after each level
        if f"input_blocks.{i}.0.op.weight" in state:
            blocks.append(count)
            level, count = level + 1, 0
        elif f"input_blocks.{i}.0.in_layers.2.weight" in state:
            if count == 0:
                widths.append(state[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0])
            if f"input_blocks.{i}.1.proj_in.weight" in state and level not in attention:
                attention.append(level)
            count += 1
        else:
            break
        i += 1
    blocks.append(count)
    first_attention = next((k for k in state if k.endswith(".1.proj_in.weight")), None)
    depth = _count(state, first_attention[: -len("proj_in.weight")] + "transformer_blocks.{}.attn1.to_q.weight") \
        if first_attention else 1
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if len(set(blocks)) != 1 or any(w % model_channels for w in widths):
        raise CheckpointError("the UNet's blocks do not follow the original UNetModel's layout")
    return dict(in_channels=int(in_channels), out_channels=int(state["out.2.weight"].shape[0]),
                model_channels=int(model_channels), channel_mult=tuple(w // model_channels for w in widths),
                num_res_blocks=blocks[0], attention_levels=tuple(attention), transformer_depth=depth,
                context_dim=int(to_k.shape[1]) if to_k is not None else None)


def vae_shapes(state) -> dict:
    """The VAEConfig fields an original-layout VAE's weights determine (not its latent scale factor)."""
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = _count(state, "encoder.down.{}.block.0.conv1.weight")
    widths = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    return dict(in_channels=int(in_channels), base_channels=int(base), channel_mult=tuple(w // base for w in widths),
                num_res_blocks=_count(state, "encoder.down.0.block.{}.conv1.weight"),
                z_channels=int(state["decoder.conv_in.weight"].shape[1]))


def text_shapes(state) -> dict:
    """The CLIPTextConfig of a CLIP text transformer's weights; heads are width / 64, as in every CLIP."""
    vocab, width = state["embeddings.token_embedding.weight"].shape
    return dict(vocab_size=int(vocab), context_length=int(state["embeddings.position_embedding.weight"].shape[0]),
                width=int(width), num_layers=_count(state, "encoder.layers.{}.self_attn.q_proj.weight"),
                num_heads=max(1, int(width) // 64), mlp_width=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]))


def read_inference_yaml(path) -> dict:
    """The sizes an original inference YAML (e.g. v1-inference.yaml) gives, in minildm's field names:
    {"unet": {...}, "vae": {...}, "scale_factor": s, "schedule": (T, beta_start, beta_end)}."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f)["model"]["params"]
        unet = params["unet_config"]["params"]
        ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not an original inference YAML (model.params.unet_config and "
                              f"first_stage_config): {first_line(e)}") from None
    if params.get("parameterization", "eps") != "eps":
        raise CheckpointError(f"{path} describes a {params['parameterization']}-prediction model; minildm samples "
                              "eps-prediction models (SD v1)")
    if unet.get("num_heads", -1) == -1:
        raise CheckpointError(f"{path} sets num_head_channels (a head width per level, as SD 2.x does); minildm's "
                              "UNet takes one head count, num_heads")
    levels = len(unet["channel_mult"])
    return {
        "unet": dict(in_channels=unet["in_channels"], out_channels=unet["out_channels"],
                     model_channels=unet["model_channels"], channel_mult=tuple(unet["channel_mult"]),
                     num_res_blocks=unet["num_res_blocks"],
                     attention_levels=tuple(lv for lv in range(levels) if 2**lv in unet["attention_resolutions"]),
                     num_heads=unet["num_heads"], transformer_depth=unet.get("transformer_depth", 1),
                     context_dim=unet.get("context_dim")),
        "vae": dict(in_channels=ddconfig["in_channels"], base_channels=ddconfig["ch"],
                    channel_mult=tuple(ddconfig["ch_mult"]), num_res_blocks=ddconfig["num_res_blocks"],
                    z_channels=ddconfig["z_channels"]),
        "scale_factor": params.get("scale_factor"),
        "schedule": (params.get("timesteps", 1000), params.get("linear_start"), params.get("linear_end")),
    }


def check_against_yaml(part: str, from_weights: dict, from_yaml: dict, path, yaml_path) -> None:
    """A one-line error at the first size on which a YAML and the weights disagree."""
    for name, value in from_weights.items():
        if name in from_yaml and from_yaml[name] != value:
            raise CheckpointError(f"{yaml_path} and {path} disagree: the YAML's {part} has {name} {from_yaml[name]}, "
                                  f"the weights have {value}")


# ----------------------------------------------------------------------------------------------------
# Strict loading into a model


def check_state_dict(name, model, state):
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys, grouped by module."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys in {summarise_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in {summarise_keys(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (file vs model), e.g. {shapes[0]}")
    if problems:
        raise CheckpointError(f"the {name} weights do not fit the {name} config: " + "; ".join(problems))


@contextlib.contextmanager
def empty_parameters():
    """Build modules whose parameters live on the meta device (no memory, no random init).

    Buffers stay real, so non-persistent buffers computed in __init__ survive; `load_module` then
    assigns the checkpoint's tensors in place of the empty parameters. The in-place initialisers of
    torch.nn.init do nothing meanwhile: there is nothing to initialise, and on the meta device they
    would cost seconds of PyTorch importing its reference implementations.
    """
    original = torch.nn.Module.register_parameter
    initialisers = {name: f for name, f in vars(torch.nn.init).items() if name.endswith("_") and callable(f)
                    and not name.startswith("_")}

    def register(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    def skip(tensor, *args, **kwargs):
        return tensor

    torch.nn.Module.register_parameter = register
    for name in initialisers:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
        for name, f in initialisers.items():
            setattr(torch.nn.init, name, f)


def load_module(name, model, state, dtype=None, device="cpu"):
    """Check `state` against `model` strictly, cast floating tensors to `dtype`, and assign them."""
    check_state_dict(name, model, state)
    cast = {}
    for k, v in state.items():
        v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        cast[k] = v
    model.load_state_dict(cast, strict=True, assign=True)
    # Buffers that were not in the state dict (non-persistent ones) follow the device and dtype too.
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point() and dtype is not None:
                module._buffers[bname] = buf.to(device=device, dtype=dtype)
            elif buf is not None:
                module._buffers[bname] = buf.to(device=device)
    return model


# ----------------------------------------------------------------------------------------------------
# minildm's own checkpoints


def _config_dict(module):
    """The config of a minildm model as a JSON-able dict (models keep it as `.cfg` or `.config`)."""
    cfg = getattr(module, "cfg", None) or getattr(module, "config", None)
    if cfg is None:
        raise ValueError(f"{type(module).__name__} has no .cfg to store in the checkpoint")
    return cfg.to_dict()


def save_checkpoint(path, *, unet=None, vae=None, text_encoder=None, ema_unet_state=None,
                    ema_text_encoder_state=None, schedule=None, scale_factor=None, dtype=None):
    """Write a minildm checkpoint: original SD key layout + configs in the "minildm" metadata entry.

    unet, vae, text_encoder: models (their `.cfg` is stored) or None; ema_unet_state: a UNet state dict
    (keys without prefix) stored under the original EMA names; ema_text_encoder_state: the same for
    a text encoder trained with the UNet, under TEXT_EMA_PREFIX; schedule: a NoiseSchedule; dtype: cast
    floating tensors (e.g. torch.float16) or keep them as they are. The file is written next to `path`
    and renamed over it, so a crash never leaves half a checkpoint behind.
    """
    from safetensors.torch import save_file

    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    state = merge_original(**{k: (m.state_dict() if m is not None else None) for k, m in modules.items()},
                           ema_unet=ema_unet_state, ema_text_encoder=ema_text_encoder_state)
    meta = {"format": FORMAT_VERSION, "prediction": "eps",
            "schedule": schedule.to_dict() if schedule is not None else None,
            "scale_factor": float(scale_factor) if scale_factor is not None else None}
    meta.update({k: (_config_dict(m) if m is not None else None) for k, m in modules.items()})

    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.data_ptr() in seen:  # safetensors refuses tensors that share memory
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any other new file (safetensors creates its files private)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path, device="cpu"):
    """A minildm (or original-layout) checkpoint as a `Checkpoint`: per-module state dicts + `.meta`."""
    return read_checkpoint(path, device)
