"""Checkpoint layouts: the only module that knows checkpoint key names.

minildm's modules are named after the original Stable Diffusion v1 code, so a model's `state_dict()`
keys are the original checkpoint's keys with one prefix removed:

    UNet           model.diffusion_model.<key>
    AutoencoderKL  first_stage_model.<key>
    CLIPTextModel  cond_stage_model.transformer.text_model.<key>

This module reads and writes three layouts and recognises the files it cannot use:

    original   one flat dict with the prefixes above (a CompVis `.ckpt` or `.safetensors`), maybe with
               EMA copies of the UNet under model_ema.<key without "model." and without dots>, and
               buffers of the training code (alphas_cumprod, position_ids, model_ema.decay, ...)
    diffusers  a folder unet/ vae/ text_encoder/ tokenizer/ scheduler/, each with a config.json and
               weights whose module names differ; the rename map is built from the config by short loops
    minildm    the original layout in a `.safetensors` file whose metadata entry "minildm" holds the
               configs, so the file is loadable without guessing (written by `save_checkpoint`); a
               text encoder trained with the UNet may have its EMA copy under cond_stage_model_ema.

Loading is strict: every source key is used once, every target is filled, shapes are equal, and a
file that is not Stable Diffusion v1 (SD 2.x, SDXL, a LoRA, a VAE-only file, a truncated download) is
named in the error instead of being half loaded. `.ckpt` files are unpickled only by PyTorch's
weights-only loader, so a pickle that wants to run code is refused before any of it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
from collections import Counter
from dataclasses import dataclass, field

import torch

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
    """A checkpoint that cannot be loaded; the message says why in words a user can act on."""


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
# Reading files: safetensors memory-mapped, .ckpt through the weights-only unpickler


def _safetensors_header(path):
    """The JSON header of a .safetensors file, after checking that the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (an incomplete download?): its header alone "
                                  f"needs {n + 8} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged: its safetensors header does not describe tensors") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated (an incomplete download?): it should be "
                              f"{8 + n + end:,} bytes but has {size:,}")
    return header


def read_safetensors(path, device="cpu"):
    """(state_dict, metadata) of a .safetensors file; on the CPU the tensors are views of a memory map."""
    from safetensors import SafetensorError, safe_open

    _safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError, RuntimeError, MemoryError) as e:  # a header it cannot use
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {_last_line(e)}") from None
    return state, metadata


def first_line(error) -> str:
    """The first non-empty line of an exception's message (at most 200 characters), for one-line errors."""
    return _last_line(error)


def _last_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def read_ckpt(path):
    """The state dict of a pickled .ckpt, refusing any pickle that wants to run code."""
    obj = load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, {}


def load_pickle(path):
    """Whatever a PyTorch pickle (.ckpt, .pt, .bin) holds, through the weights-only loader: tensors,
    dicts, lists, numbers and strings come back; a pickle that wants to run code is refused."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise CheckpointError(
                f"refusing to load {path}: its pickle wants to call {culprit.group(1)}, which is code, not "
                "tensors. Only load .ckpt files you trust, or use a .safetensors file instead") from None
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (damaged, or not a "
                              ".ckpt file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            MemoryError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated, or not a "
                              f".ckpt file?): {_last_line(e)}") from None
    return obj


# ----------------------------------------------------------------------------------------------------
# Textual-inversion embeddings: a token string and one or more vectors for the text encoder's table

def read_textual_inversion(path):
    """(token or None, vectors (n, D)) of a textual-inversion file, in any of the layouts people share:

        diffusers    {token: (D,) or (n, D)}                      .bin / .safetensors
        A1111 .pt    {"string_to_param": {"*": (n, D)}, "name": token, ...}
        A1111        {"emb_params": (n, D)}                       .safetensors (the token is the file name)

    None for the token means the file does not name one. Pickles go through the weights-only loader.
    """
    kind = sniff(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a textual-inversion embedding")
    if str(path).endswith(".safetensors"):
        state, _ = read_safetensors(path)
    else:
        state = load_pickle(path)
    token, vectors = None, None
    if isinstance(state, torch.Tensor):
        vectors = state
    elif isinstance(state, dict) and isinstance(state.get("string_to_param"), dict):
        params = list(state["string_to_param"].values())
        vectors = params[0] if len(params) == 1 else None
        token = state.get("name") if isinstance(state.get("name"), str) else None
    elif isinstance(state, dict) and "emb_params" in state:
        vectors = state["emb_params"]
    elif isinstance(state, dict) and len(state) == 1:
        token, vectors = next(iter(state.items()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        kind = (identify(state) if isinstance(state, dict) and len(state) > 1
                and all(isinstance(k, str) for k in state) else "unknown")
        raise CheckpointError(f"{path} is not a textual-inversion embedding (one token's vectors)"
                              + (f": it is {describe(kind)}" if kind != "unknown" else ""))
    return token, vectors.detach().reshape(-1, vectors.shape[-1]).float()


# The first bytes of files people mistake for checkpoints, and what to call them.
FILE_SIGNATURES = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or WAV sound)"), (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"), (b"\x7fELF", "a program (ELF)"),
    (b"<!DOCTYPE", "an HTML page (a download that saved the web page?)"), (b"<html", "an HTML page"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run git lfs pull)"),
)


def sniff(path) -> str | None:
    """What a file is, by its first bytes, when it is clearly not a checkpoint: 'a PNG image', ...;
    None for what may be one (safetensors, a zip or pickle .ckpt)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    for magic, name in FILE_SIGNATURES:
        if head.lstrip()[:len(magic)].lower() == magic.lower():
            return name
    if head[:2] == b"PK" or head[:1] == b"\x80":       # a zip (torch.save) or a raw pickle
        return None
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] < 100_000_000 and head[8:9] == b"{":
        return None                                        # a safetensors header: length, then JSON
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\n\r\t" for c in text):
            return "a text file"
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:                       # cut in the middle of a character
            return "a text file"
    return "not a format minildm knows (neither safetensors nor a PyTorch .ckpt)"


def read_state_dict(path, device="cpu"):
    """(state_dict, metadata) of a .safetensors or .ckpt/.pt/.pth/.bin file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied)")
    what = sniff(path)
    if what is not None:
        kind = "safetensors file" if path.endswith(".safetensors") else "checkpoint"
        raise CheckpointError(f"{path} is not a {kind}: it is {what}" if what[0] in "ae" else f"{path} is {what}")
    if path.endswith(".safetensors"):
        return read_safetensors(path, device)
    with open(path, "rb") as f:
        magic = f.read(8)
    if len(magic) == 8 and magic[:2] not in (b"PK", b"\x80\x02") and struct.unpack("<Q", magic)[0] < 100_000_000:
        return read_safetensors(path, device)  # a safetensors file with another extension
    return read_ckpt(path)


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
    from .unet import UNetConfig

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
                norm_groups=d.get("norm_num_groups", 32))
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
        use_linear_projection=False)


def vae_config_from_diffusers(d):
    """A VAEConfig from a diffusers vae/config.json dict."""
    from .vae import VAEConfig

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
    from .clip_text import CLIPTextConfig

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

    configs holds "unet", "vae", "text_encoder" (minildm config objects), "schedule" (a dict of
    diffusers' scheduler config or None) and "tokenizer" (the tokenizer folder or None).
    """
    path = os.fspath(path)
    for part in ("unet", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(path, part)):
            raise CheckpointError(f"{path} is not a diffusers folder: it has no {part}/ subfolder")
    unet_cfg = unet_config_from_diffusers(_read_json(os.path.join(path, "unet", "config.json")))
    vae_json = _read_json(os.path.join(path, "vae", "config.json"))
    vae_cfg = vae_config_from_diffusers(vae_json)
    text_cfg = text_config_from_diffusers(_read_json(os.path.join(path, "text_encoder", "config.json")))
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
        text_encoder=text_from_diffusers(_folder_weights(os.path.join(path, "text_encoder"))))
    configs = {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg, "schedule": sched,
               "scale_factor": vae_json.get("scaling_factor", 0.18215),
               "tokenizer": tok if os.path.isdir(tok) else None}
    return ckpt, configs
