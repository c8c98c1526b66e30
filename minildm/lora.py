"""LoRA: a fine-tune shipped as low-rank weight deltas, merged into the model's own weights.

A LoRA file holds, for some layers W (out, in) or convolutions W (out, in, kh, kw) of the UNet and the
text encoder, a "down" matrix A (r, in[, kh, kw]) and an "up" matrix B (out, r[, 1, 1]) of small rank r,
and often a number alpha. Merging adds their product to the weight:

    W <- W + scale * (alpha / r) * B A          (alpha = r when the file has none)

after which the model runs at its usual speed and nothing else changes. Several LoRAs add up.

Files name the layers in one of two ways, both after diffusers' module names (with the original SD
names accepted too), never after minildm's, so each name goes through convert's rename maps:

    kohya (A1111, ComfyUI)  lora_unet_<module path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
                            lora_te_<text_model.... path, "." -> "_">...
    diffusers / PEFT        unet.<module path>.lora_A.weight / .lora_B.weight (older files: .lora.down/.up,
                            .lora_linear_layer.down/.up, or processor.to_q_lora.down/.up),
                            text_encoder.<module path>....

A name with no counterpart, or a shape that does not fit, means a LoRA for another model (SD 2.x, SDXL):
nothing is merged and the error says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import convert


# The LCM-LoRA for SD v1.5 (latent-consistency/lcm-lora-sdv1-5, pytorch_lora_weights.safetensors, 135 MB) was
# trained with train_lcm_distill_lora_sd_wds.py (luosiallen/latent-consistency-model; diffusers'
# examples/consistency_distillation): a peft LoraConfig on the UNet alone, at the modules below, r = 64
# (--lora_rank=64 in its README) and no lora_alpha, so peft's default 8. The file is in the kohya layout with
# diffusers' module names, lora_unet_<module path, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
# (as the script's get_module_kohya_state_dict writes it), float16; peft gives a 3x3 convolution a 3x3 down
# and every convolution a 1x1 up. For SD v1.5 that is 278 layers, 67.25M numbers, 134.5 MB: the file's size.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class LoraLayer:
    """One layer's delta: which model part, its key in minildm's (original) layout, down, up, alpha."""

    part: str                 # "unet" or "text_encoder"
    key: str                  # the weight's key in the part's state dict, e.g. "...attn1.to_q.weight"
    down: torch.Tensor        # A (r, in[, kh, kw])
    up: torch.Tensor          # B (out, r[, 1, 1])
    alpha: float | None       # None: alpha = r

    def check(self, shape) -> None:
        """Raise ValueError unless B A fits a weight of this shape (without computing it)."""
        out, rank, inner = self.up.shape[0], self.down.shape[0], self.down[0].numel()
        if self.up[0].numel() != rank or out * inner != torch.Size(shape).numel():
            raise ValueError(f"shape ({out}, {inner}) (a rank-{rank} down matrix, an up matrix {tuple(self.up.shape)})")

    def add_to(self, weight: torch.Tensor, scale: float) -> None:
        """weight += scale * alpha / r * B A, in place (in float32 for a weight of lower precision)."""
        rank = self.down.shape[0]
        alpha = rank if self.alpha is None else self.alpha
        w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
        up, down = self.up.flatten(1).to(w), self.down.flatten(1).to(w)
        if w.is_contiguous():  # (out, in * kh * kw) += (out, r) @ (r, in * kh * kw), no weight-sized temporary
            w.view(w.shape[0], -1).addmm_(up, down, alpha=scale * alpha / rank)
        else:
            w.add_((up @ down).view(w.shape), alpha=scale * alpha / rank)
        if w is not weight:
            weight.copy_(w.to(weight.dtype))


# ---------------------------------------------------------------------------- names

def diffusers_names(model, part: str) -> dict:
    """Weight key of this model part ("unet" or "text_encoder") -> the module name LoRA files use for it:
    diffusers' for the UNet, transformers' for the text encoder."""
    keys = [k for k in model.state_dict() if k.endswith(".weight")]
    if part == "unet":
        return {ours: theirs[: -len(".weight")]
                for theirs, ours in convert.unet_to_diffusers({k: k for k in keys}, model.cfg).items()}
    return {key: "text_model." + key[: -len(".weight")] for key in keys}


def kohya_name(part: str, module: str) -> str:
    """A module's name in the kohya layout: lora_unet_ / lora_te_ and the module path with "." -> "_"."""
    return ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")


def _module_names(model, part: str) -> dict:
    """Every name a LoRA may use for a weight of this model part -> its key in the part's state dict."""
    names = {}
    for key, module in diffusers_names(model, part).items():
        names[module] = key
        names[kohya_name(part, module)] = key
    if part == "unet":
        for key in [k for k in model.state_dict() if k.endswith(".weight")]:
            # the original (CompVis) module names, which some kohya files use
            names[kohya_name(part, key[: -len(".weight")])] = key
    return names


KOHYA = re.compile(r"^(lora_(?:unet|te)_.+?)\.(lora_down|lora_up|alpha)(?:\.weight)?$")
DIFFUSERS = re.compile(r"^(unet|text_encoder)\.(.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down"
                       r"|lora_linear_layer\.up)\.weight$|^(unet|text_encoder)\.(.+?)\.alpha$")
PROCESSOR = re.compile(r"^unet\.(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _other_family(keys) -> str | None:
    """A few words on what model a LoRA was made for, when its names say it is not SD v1."""
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "an SDXL LoRA (it adapts two text encoders)"
    return None


def read_lora(path, unet, text_encoder) -> list[LoraLayer]:
    """The layers of a LoRA file, matched to this UNet's and text encoder's weights."""
    state, _ = convert.read_state_dict(path)
    if not state or not any("lora" in k for k in state):
        kind = convert.identify(state)
        what = {"sd1": "a Stable Diffusion v1 checkpoint (a whole model: give it as --ckpt)",
                "minildm": "a minildm checkpoint (a whole model: give it as --ckpt)"}.get(kind, convert.describe(kind))
        raise convert.CheckpointError(f"{path} is not a LoRA" + ("" if kind == "unknown" else f": it is {what}"))
    other = _other_family(state)
    if other:
        raise convert.CheckpointError(f"{path} is {other}; minildm applies LoRAs made for SD v1")
    names = {"unet": _module_names(unet, "unet"),   # an image-variations model has no text encoder
             "text_encoder": _module_names(text_encoder, "text_encoder") if text_encoder is not None else {}}
    found: dict[tuple, dict] = {}
    for key, value in state.items():
        if (m := KOHYA.match(key)):
            name, what = m.group(1), m.group(2)
            part = "unet" if name.startswith("lora_unet_") else "text_encoder"
            what = {"lora_down": "down", "lora_up": "up"}.get(what, what)
        elif (m := PROCESSOR.match(key)):
            part, name = "unet", m.group(1) + "." + (m.group(2) if m.group(2) != "to_out" else "to_out.0")
            what = m.group(3)
        elif (m := DIFFUSERS.match(key)):
            if m.group(1):
                part, name = m.group(1), m.group(2)
                what = "down" if re.search(r"(lora_A|\.down)\.weight$", key) else "up"
            else:
                part, name, what = m.group(3), m.group(4), "alpha"
        else:
            raise convert.CheckpointError(f"{path}: {key} is not a LoRA weight name minildm knows")
        found.setdefault((part, name), {})[what] = value
    layers = []
    for (part, name), parts in found.items():
        if name not in names[part]:
            raise convert.CheckpointError(f"{path} was made for another model: {name} has no counterpart in this "
                                          f"SD v1 {part.replace('_', ' ')}")
        if "down" not in parts or "up" not in parts:
            raise convert.CheckpointError(f"{path}: {name} has no {'down' if 'down' not in parts else 'up'} matrix")
        alpha = parts.get("alpha")
        layers.append(LoraLayer(part, names[part][name], parts["down"].float(), parts["up"].float(),
                                None if alpha is None else float(alpha)))
    return layers


# ---------------------------------------------------------------------------- merging

@torch.no_grad()
def merge_lora(unet, text_encoder, path, scale: float = 1.0) -> int:
    """Add a LoRA's deltas, times `scale`, to the weights of unet and text_encoder; returns the number
    of layers changed. Every delta is checked before any weight changes."""
    layers = read_lora(path, unet, text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}
    updates = []
    for layer in layers:
        weight = models[layer.part].get_parameter(layer.key)
        try:
            layer.check(weight.shape)
        except ValueError as e:
            raise convert.CheckpointError(f"{path} was made for another model: its {layer.key} delta has "
                                          f"{e}, the weight is {tuple(weight.shape)}") from None
        updates.append((layer, weight))
    # In place, one layer at a time: a LoRA on every layer (the LCM-LoRA) has deltas as large as the
    # model, and gigabytes of fresh memory for them would take longer than the products themselves.
    for layer, weight in updates:
        layer.add_to(weight, scale)
    return len(updates)
