"""Fine-tuning: teach a trained model a new style or concept from a handful of images.

A whole training run learns from tens of thousands of images; a fine-tune adds one idea from a dozen,
in minutes, and ships as a file small enough to share. Two ways, the two that people share for SD v1:

    LoRA               every weight W of the model stays frozen. Beside chosen layers a low-rank pair
                       is trained, so the layer computes  W x + (alpha / r) B (A x),  with A (r, in) and
                       B (out, r). B starts at zero: step 0 is exactly the base model. Saved in the kohya
                       or the diffusers layout that `lora.py` reads, and merged at load time:
                       W <- W + scale (alpha / r) B A.
    textual inversion  every weight stays frozen, the text encoder's included. A new word is added to
                       the tokenizer with n new rows in the token table, started from a word's vector,
                       and only those rows are trained. Saved as {word: (n, D)}, diffusers' layout.

A third fine-tune teaches a CIFAR run to read photos as prompts: an image adapter (image_adapter.py), new
keys and values that let the frozen model's cross-attention read its own VAE's latents of a photo, trained
on the run's training photos, each prompted with another photo of its class.

All three minimise the stage-2 objective (`steps.diffusion_loss`) with the base model's own VAE, text encoder
and schedule; the same LoRA and textual-inversion code fine-tunes a CIFAR run on a CPU and SD v1 on a GPU.
The command line:

    python -m minildm.finetune example --data-dir cifar10-train-jpg.tar.gz --out bw-photos
    python -m minildm.finetune lora --ckpt runs/cifar --images bw-photos --text-encoder --out bw-lora.safetensors
    python -m minildm.finetune embedding --ckpt runs/cifar --images bw-photos --word "<bw>" \\
        --caption "a <bw> photo of a {}" --out bw-word.safetensors
    python -m minildm.sample "a black and white photo of a dog" --ckpt runs/cifar --lora bw-lora.safetensors
    python -m minildm.finetune image-prompt --ckpt runs/cifar --out photo-prompts.safetensors
    python -m minildm.evaluate runs/cifar --image-adapter photo-prompts.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import lora, steps
from .ldm.model import to_diffusion_latents

# Layers a LoRA adapts, by the last part of their diffusers module name. "attention" is what SD v1 LoRAs
# for a subject or a style usually train (diffusers' train_text_to_image_lora.py); "all" adds the
# feed-forward layers, the transformers' projections and the ResBlocks' convolutions, as the LCM-LoRA does.
TARGETS = {"attention": ("to_q", "to_k", "to_v", "to_out.0"), "all": lora.LCM_LORA_TARGETS}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")    # the text encoder's attention, with --text-encoder
LAYOUTS = ("kohya", "diffusers")


# ---------------------------------------------------------------------------- LoRA adapters

class LowRankDelta(nn.Module):
    """A LoRA layer while it trains: a parametrization that makes a frozen weight W (out, in) or (out, in, kh, kw)
    read as W + (alpha / r) B A, with A = `down` (r, in[, kh, kw]) and B = `up` (out, r[, 1, 1]).

    The model's code keeps using `layer.weight` as before (the UNet reads some weights directly), and the
    sum is the one merging a LoRA file computes; B starts at zero, A like a fresh layer's weight."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, name: str = "",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.name = name                        # the layer's diffusers module name, which files use
        bound = 1 / math.sqrt(weight[0].numel())                                 # 1 / sqrt(fan-in)
        down = (torch.rand(rank, *weight.shape[1:], generator=generator) * 2 - 1) * bound   # drawn on the CPU
        self.down = nn.Parameter(down.to(weight.device))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, *[1] * (weight.dim() - 2), device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.up.flatten(1) @ self.down.flatten(1)                        # (out, in * kh * kw)
        return weight + (self.alpha / self.rank) * delta.view(weight.shape).to(weight.dtype)

    def layer(self, part: str, key: str) -> lora.LoraLayer:
        """The trained pair as the merge code sees a layer read from a file."""
        return lora.LoraLayer(part, key, self.down.detach().float(), self.up.detach().float(), float(self.alpha))


def add_lora(model, rank: int = 4, alpha: float | None = None, targets: str = "attention",
             text_encoder: bool = False, seed: int = 0) -> dict:
    """Make every target layer of the UNet (and the text encoder's attention) a LoRA layer to train, its A
    drawn from `seed`.

    Every weight of the model is frozen. Returns {(part, key): LowRankDelta}, key the adapted weight's key."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    parts = [("unet", model.unet, TARGETS[targets])] + ([("text_encoder", model.text_encoder, TEXT_TARGETS)]
                                                       if text_encoder else [])
    adapters = {}
    for part, root, wanted in parts:
        for key, name in lora.diffusers_names(root, part).items():
            layer = root.get_submodule(key[: -len(".weight")])
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or not name.endswith(tuple("." + w for w in wanted)):
                continue
            adapters[(part, key)] = delta = LowRankDelta(layer.weight, rank, alpha, name, generator)
            parametrize.register_parametrization(layer, "weight", delta)
    if not adapters:
        raise ValueError(f"no {targets} layers to adapt in this model")
    return adapters


@torch.no_grad()
def remove_lora(model, adapters: dict, merge: bool = True) -> None:
    """Give every layer its plain weight back; with `merge`, then add each trained B A into it by the code that
    merges a LoRA file (so the fine-tuned model equals the base model with the saved file loaded)."""
    roots = {"unet": model.unet, "text_encoder": model.text_encoder}
    for (part, key), delta in adapters.items():
        layer = roots[part].get_submodule(key[: -len(".weight")])
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if merge:
            delta.layer(part, key).add_to(layer.weight, 1.0)


def lora_state_dict(adapters: dict, layout: str = "kohya") -> dict:
    """The trained pairs as a LoRA file's tensors.

    kohya      lora_unet_<diffusers module, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha
               (lora_te_ for the text encoder): what A1111, ComfyUI and diffusers read.
    diffusers  unet.<module>.lora_A.weight / .lora_B.weight (text_encoder.<module>...), the layout of
               diffusers' own save_lora_weights; it has no alpha, so alpha / r is folded into B."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = {}
    for (part, key), adapter in adapters.items():
        down = adapter.down.detach().float().contiguous()
        up = adapter.up.detach().float().contiguous()
        name = adapter.name
        if layout == "kohya":
            prefix = lora.kohya_name(part, name)
            state[prefix + ".lora_down.weight"] = down
            state[prefix + ".lora_up.weight"] = up
            state[prefix + ".alpha"] = torch.tensor(float(adapter.alpha))
        else:
            state[f"{part}.{name}.lora_A.weight"] = down
            state[f"{part}.{name}.lora_B.weight"] = up * (adapter.alpha / adapter.rank)
    return state


# ---------------------------------------------------------------------------- textual inversion

class NewWord:
    """A word added to a model's tokenizer and token table whose `vectors` (n, D) are the only thing trained.

    While it lives, a hook on the token table hands the text encoder `vectors` for the new ids, so the
    gradient reaches them and nothing else; `finish()` writes them into the table and removes the hook."""

    def __init__(self, model, word: str, num_vectors: int = 1, init_word: str = "photo"):
        init_ids = model.tokenizer.encode(init_word)
        if not init_ids:
            raise ValueError(f"--init-word {init_word!r} has no tokens")
        table = model.text_encoder.embeddings.token_embedding
        start = table.weight[torch.tensor(init_ids, device=table.weight.device)].detach().float().mean(0)
        self.word = word
        self.ids = model.tokenizer.add_tokens(word, num_vectors)
        model.requires_grad_(False)
        assert model.text_encoder.add_token_vectors(start.expand(num_vectors, -1)) == self.ids
        self.table = model.text_encoder.embeddings.token_embedding
        self.vectors = nn.Parameter(start.expand(num_vectors, -1).clone())
        self._hook = self.table.register_forward_hook(self._substitute)

    def _substitute(self, module, inputs, output):
        tokens = inputs[0]
        new = tokens >= self.ids[0]                                         # (B, L)
        rows = self.vectors[(tokens - self.ids[0]).clamp(0, len(self.ids) - 1)]   # (B, L, D)
        return torch.where(new[..., None], rows.to(output.dtype), output)

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        self._hook.remove()
        self.table.weight[self.ids[0]:] = self.vectors.to(self.table.weight)
        return self.vectors.detach().float().clone()


# ---------------------------------------------------------------------------- the training loop

def latent_batch(model, mean: torch.Tensor, std: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> tuple:
    """One step's draws for the cached posteriors' `rows`, in this order: a posterior sample z (scaled),
    timesteps t and noise, all from `generator`; z and noise on the model's device."""
    eps = torch.randn(mean[rows].shape, generator=generator)
    z = to_diffusion_latents(mean[rows] + std[rows] * eps, model.scale_factor).to(model.device)
    t = torch.randint(0, model.schedule.num_timesteps, (len(rows),), generator=generator)
    noise = torch.randn(z.shape, generator=generator).to(model.device)
    return z, t, noise


def optimizer_step(optimizer, loss: torch.Tensor, losses: list, bar) -> None:
    """Backpropagate `loss`, step, and show the mean of the last 20 losses on the progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")


def fine_tune(model, images: torch.Tensor, captions: list, params: list, *, num_steps: int = 300,
              batch_size: int = 8, lr: float = 1e-3, min_snr_gamma: float | None = 5.0, seed: int = 0,
              amp: bool = False, flip: bool = True, progress: bool = True) -> list:
    """Train `params` (adapters or a new word's vectors; everything else frozen) on images and their captions
    with the stage-2 objective; returns the loss of every step.

    Each step: a batch of images drawn with replacement, a fresh posterior sample of their latents, t and
    noise as in training, AdamW (no weight decay: a LoRA's zero start and a word's vector are the prior)."""
    from .plumbing import autocast, progress_bar
    from .train.stage2 import cache_latents

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = model.device
    # The latents' posterior, encoded once (mirrored copies after the originals); each step samples from it.
    mean, std = cache_latents(model.vae, torch.cat([images, images.flip(-1)]) if flip else images, device,
                              batch_size=8)
    tokens = model.tokenizer(list(captions) * (2 if flip else 1)).to(device)        # (N, L)
    denoiser = steps.Denoiser(model.unet, model.text_encoder)
    optimizer = steps.adamw(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = progress_bar(num_steps, "fine-tuning", progress)
    for _ in range(num_steps):
        rows = torch.randint(0, len(mean), (batch_size,), generator=generator)
        z, t, noise = latent_batch(model, mean, std, rows, generator)
        with autocast(amp, device):
            loss = steps.diffusion_loss(denoiser, model.schedule, z, tokens[rows], t.to(device), noise,
                                        min_snr_gamma)
        optimizer_step(optimizer, loss, losses, bar)
    bar.close()
    return losses


def train_lora(model, images, captions, *, rank: int = 4, alpha: float | None = None, targets: str = "attention",
               text_encoder: bool = False, layout: str = "kohya", seed: int = 0, **options) -> tuple:
    """Fine-tune a LoRA and merge it: (the LoRA file's tensors, the losses). The model ends up equal to the
    base model with that file loaded at scale 1. `seed` draws the A matrices and, in fine_tune, the batches,
    timesteps and noise."""
    adapters = add_lora(model, rank, alpha, targets, text_encoder, seed)
    params = [p for delta in adapters.values() for p in (delta.down, delta.up)]
    try:
        losses = fine_tune(model, images, captions, params, seed=seed, **options)
    except BaseException:
        remove_lora(model, adapters, merge=False)
        raise
    state = lora_state_dict(adapters, layout)
    remove_lora(model, adapters, merge=True)
    return state, losses


def train_word(model, images, captions, word: str, *, num_vectors: int = 1, init_word: str = "photo",
               **options) -> tuple:
    """Fine-tune a new word (textual inversion): ((n, D) vectors, the losses). The word stays in the model."""
    keep = [i for i, c in enumerate(captions) if word in c]    # without the word a caption trains nothing
    if not keep:
        raise ValueError(f"no caption contains the new word {word!r}: write it where the concept belongs, "
                         f"e.g. {('a ' + word + ' photo of a cat')!r}")
    images, captions = images[keep], [captions[i] for i in keep]
    new = NewWord(model, word, num_vectors, init_word)
    try:
        losses = fine_tune(model, images, captions, [new.vectors], **options)
    finally:
        vectors = new.finish()
    return vectors, losses


def reference_rows(rows: torch.Tensor, labels: torch.Tensor, pairing: str, generator: torch.Generator,
                   photos: int | None = None) -> torch.Tensor:
    """The photo each training row is prompted with: itself ("self"), or another photo of its class ("class",
    drawn uniformly; itself only when its class has one photo). With `photos`, rows i and i + photos are the
    same photo (a mirrored copy) and neither is another photo of the other."""
    if pairing == "self":
        return rows
    if pairing != "class":
        raise ValueError(f"pairing must be 'class' or 'self', got {pairing!r}")
    photos = photos or len(labels)
    refs = torch.empty_like(rows)
    for i, row in enumerate(rows.tolist()):
        same = (labels == labels[row]).nonzero().flatten()
        others = same[same % photos != row % photos]
        same = others if len(others) else same
        refs[i] = same[torch.randint(len(same), (1,), generator=generator)]
    return refs


def train_image_adapter(model, images: torch.Tensor, labels: torch.Tensor, *, pairing: str = "class",
                        num_steps: int = 2000, batch_size: int = 32, lr: float = 1e-3,
                        min_snr_gamma: float | None = 5.0, seed: int = 0, amp: bool = False,
                        progress: bool = True) -> tuple:
    """Teach a frozen text-to-image model to read image prompts (image_adapter.py): (the ImageAdapter, the loss of
    every step). Only the adapter trains; each step denoises a batch of photos (mirrored half the time) given
    the empty caption and, as the image prompt, the posterior mean of `pairing`'s reference photo."""
    from .image_adapter import ImageAdapter, ImageAdapterConfig
    from .plumbing import autocast, progress_bar
    from .train.stage2 import cache_latents

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if model.text_encoder is None:
        raise ValueError("an image adapter goes on a text-to-image model; this one reads image prompts already")
    device, f = model.device, model.downsample_factor
    if images.shape[-1] != images.shape[-2] or images.shape[-1] % f:
        raise ValueError(f"the photos must be square and a multiple of {f} pixels, got {tuple(images.shape[-2:])}")
    mean, std = cache_latents(model.vae, torch.cat([images, images.flip(-1)]), device)   # mirrored copies after
    labels = torch.cat([labels, labels]).cpu()
    references = to_diffusion_latents(mean, model.scale_factor)                  # the prompt: the posterior mean
    unet = model.unet
    cfg = ImageAdapterConfig(latent_channels=mean.shape[1], latent_size=mean.shape[-1],
                             context_dim=unet.cfg.context_dim,
                             emb_dim=unet.context_emb.out_features if unet.cfg.pooled_context else None,
                             pairing=pairing)
    with torch.random.fork_rng(devices=[]):  # the new layers' start drawn from `seed`, the caller's stream untouched
        torch.manual_seed(seed)
        adapter = ImageAdapter(cfg, unet).to(device)
    model.requires_grad_(False)
    adapter.requires_grad_(True)
    empty = model.text_encoder(model.tokenizer([""]).to(device))                  # (1, L, D): no caption
    optimizer = steps.adamw(adapter.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = progress_bar(num_steps, "image adapter", progress)
    with adapter.attached(unet):
        for _ in range(num_steps):
            rows = torch.randint(0, len(mean), (batch_size,), generator=generator)
            refs = reference_rows(rows, labels, pairing, generator, photos=len(images))
            z, t, noise = latent_batch(model, mean, std, rows, generator)
            with autocast(amp, device):
                context = adapter.context(references[refs].to(device), empty.expand(batch_size, -1, -1))
                loss = steps.diffusion_loss(unet, model.schedule, z, context, t.to(device), noise, min_snr_gamma)
            optimizer_step(optimizer, loss, losses, bar)
    bar.close()
    return adapter.eval().requires_grad_(False), losses


def save_tensors(path, state: dict, metadata: dict) -> None:
    """A .safetensors file with string metadata (how it was made)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


# ---------------------------------------------------------------------------- a set to practise on

def black_and_white(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images -> the same images in grey (ITU-R 601 luma), still 3 channels."""
    luma = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).round().clamp(0, 255)
    return luma.to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()


def saturation(images: torch.Tensor) -> torch.Tensor:
    """How colourful each image is (B,): the mean over pixels of max(R, G, B) - min(R, G, B), pixels in [0, 1]
    (images in [-1, 1] or uint8). 0 for a black-and-white image; CIFAR-10 photos average about 0.2."""
    x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
    return (x.amax(1) - x.amin(1)).flatten(1).mean(1)


def example_set(data, per_class: int = 2, seed: int = 0, colour: bool = True) -> tuple:
    """(uint8 images, captions) to practise on: `per_class` photos of each class of `data` (pass the held-out
    split, photos the model never saw) in black and white, captioned "a black and white photo of a <class>";
    with `colour`, as many other photos left in colour and captioned "a photo of a <class>".

    The colour photos are the contrast: a LoRA learns whatever tells its captions apart, and shown only
    grey photos it learns "everything is grey", whatever the prompt says (bench/RESULTS.md measures both)."""
    generator = torch.Generator().manual_seed(seed)
    grey, colourful = [], []
    for label in range(len(data.class_names)):
        where = (data.labels == label).nonzero().flatten()
        order = where[torch.randperm(len(where), generator=generator)].tolist()
        grey += order[:per_class]
        colourful += order[per_class:2 * per_class] if colour else []
    name = [article(data.class_names[data.labels[i]]) for i in grey + colourful]
    captions = [f"a black and white photo of {n}" for n in name[:len(grey)]] + [f"a photo of {n}" for n in
                                                                                  name[len(grey):]]
    return torch.cat([black_and_white(data.images[grey]), data.images[colourful]]), captions


def article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


# ---------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    from .cli import Parser

    p = Parser(prog="python -m minildm.finetune", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Teach a trained model a new style or concept from a handful of images: a LoRA file "
                           "or a new word (textual inversion), loadable by python -m minildm.sample and diffusers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{lora,embedding,image-prompt,example}")
    for name, what in (("lora", "train a LoRA (low-rank deltas of the UNet's layers)"),
                       ("embedding", "train a new word's vectors (textual inversion)")):
        s = sub.add_parser(name, help=what, description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--ckpt", default=None, help="the model to fine-tune: a training run's folder or file, or "
                                                    "SD v1 weights (default: the newest run in --runs-dir)")
        s.add_argument("--runs-dir", default="runs", help="where to look for the newest training run")
        s.add_argument("--images", required=True, help="a folder of images, captioned by captions.jsonl, a .txt "
                                                       "beside each image, or the name of its folder")
        s.add_argument("--caption", default=None, help='one caption for every image; "{}" stands for the name '
                                                       "of the image's folder")
        s.add_argument("--out", required=True, help="the .safetensors file to write")
        s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        s.add_argument("--steps", type=int, default=600 if name == "lora" else 500, help="optimizer steps")
        s.add_argument("--batch-size", type=int, default=8, help="images per step")
        s.add_argument("--lr", type=float, default=1e-3 if name == "lora" else 5e-2, help="AdamW learning rate")
        s.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR weighting of the loss (0: off)")
        s.add_argument("--no-flip", action="store_true", help="no mirrored copies (for images with text or sides)")
        s.add_argument("--seed", type=int, default=0, help="seed of the LoRA's initial A, the batches, timesteps "
                                                           "and noise")
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
        s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                       help="the frozen weights' dtype (the trained numbers stay float32)")
        s.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision (default: on a GPU; a fine-tune's small batches run faster in "
                            "float32 on a CPU)")
        if name == "lora":
            s.add_argument("--rank", type=int, default=4, help="r: the rank of each layer's delta B A")
            s.add_argument("--alpha", type=float, default=None, help="alpha: the delta is scaled by alpha / r "
                                                                     "(default: alpha = r)")
            s.add_argument("--targets", choices=tuple(TARGETS), default="attention",
                           help="which layers: the transformers' attention, or every layer LCM-LoRA adapts")
            s.add_argument("--text-encoder", action="store_true",
                           help="adapt the text encoder's attention too (needed when the new words are ones the "
                                "model learnt to ignore)")
            s.add_argument("--layout", choices=LAYOUTS, default="kohya", help="the file's key layout")
        else:
            s.add_argument("--word", required=True, help='the new word, e.g. "<bw>"; only the images whose caption '
                                                         "has it train it")
            s.add_argument("--in-place-of", default=None, metavar="PHRASE",
                           help='put the word in place of PHRASE in the captions (e.g. "black and white")')
            s.add_argument("--init-word", default="photo", help="the word whose vector the new one starts from")
            s.add_argument("--vectors", type=int, default=1, help="how many token vectors the new word has")
    what = ("teach a CIFAR run to read image prompts: an image adapter on its own VAE's latents, trained on the "
            "run's training photos")
    a = sub.add_parser("image-prompt", help=what, description=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--ckpt", default=None, help="the training run's folder (default: the newest run in --runs-dir)")
    a.add_argument("--runs-dir", default="runs", help="where to look for the newest training run")
    a.add_argument("--data-dir", default=None, help="the run's data set, if it has moved since the run (its "
                                                    "config.json says where it was)")
    a.add_argument("--pairing", choices=("class", "self"), default="class",
                   help="what each photo is prompted with while it trains: another photo of its class (the prompt "
                        "then carries the class) or itself (the prompt is copied)")
    a.add_argument("--out", required=True, help="the .safetensors file to write")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    a.add_argument("--batch-size", type=int, default=32, help="photos per step")
    a.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    a.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR weighting of the loss (0: off)")
    a.add_argument("--seed", type=int, default=0, help="seed of the batches, pairs, timesteps and noise")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    a.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on a GPU)")
    e = sub.add_parser("example", help="a handful of held-out CIFAR-10 photos to practise on: some in black and "
                                       "white, as many in colour",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--data-dir", default=None, help="local copy of CIFAR-10 (the data set's README says which)")
    e.add_argument("--per-class", type=int, default=2, help="black-and-white photos per class (and as many in colour)")
    e.add_argument("--seed", type=int, default=0, help="which photos")
    e.add_argument("--out", required=True, help="folder to write the PNGs and captions.jsonl into")
    return p


def read_images(folder: str, caption: str | None, resolution: int) -> tuple:
    """(uint8 images, captions) of a folder: its own captions, or `caption` for all ("{}": the folder's name)."""
    from .data import load_folder

    data = load_folder(folder, resolution=resolution)
    if caption is None:
        return data.images, [data.caption(i) for i in range(len(data))]
    names = [data.class_names[label] if label >= 0 else "" for label in data.labels.tolist()]
    return data.images, [caption.replace("{}", name) for name in names]


def check_training_flags(args) -> None:
    """The optimizer's flags every fine-tune has, each refused in one line (exit 2)."""
    from .cli import check_float, check_int, check_seed

    check_int("--steps", args.steps, 1)
    check_int("--batch-size", args.batch_size, 1)
    check_float("--lr", args.lr, 0.0, 1.0, low_open=True)
    check_float("--min-snr-gamma", args.min_snr_gamma, 0.0)
    check_seed("--seed", args.seed)


def output_file(args) -> str:
    """--out as it will be written: a new name unless --overwrite, a .safetensors file in a writable folder."""
    from .cli import check_writable_dir, fail, free_path

    out = free_path(args.out, args.overwrite)
    if not out.endswith(".safetensors"):
        fail(f"--out {out}: write a .safetensors file", 2)
    check_writable_dir("--out", os.path.dirname(os.path.abspath(out)))
    return out


def main(argv=None) -> int:
    from .cli import check_float, check_int, fail, load_model
    from .data import DataError

    args = build_parser().parse_args(argv)
    if args.command == "example":
        return _write_example(args)
    if args.command == "image-prompt":
        return _image_prompt(args)
    check_training_flags(args)
    if args.command == "lora":
        check_int("--rank", args.rank, 1, 1024)
        if args.alpha is not None:
            check_float("--alpha", args.alpha, 1e-6)
    else:
        check_int("--vectors", args.vectors, 1, 75)
    out = output_file(args)
    if not os.path.isdir(args.images):
        fail(f"--images {args.images} is not a folder of images", 2)
    model, path = load_model(args.ckpt, args.runs_dir, args.device, args.dtype)
    try:
        images, captions = read_images(args.images, args.caption, model.default_size)
    except DataError as e:
        fail(str(e), 2)
    if args.command == "embedding":
        if args.in_place_of:
            captions = [c.replace(args.in_place_of, args.word) for c in captions]
        why = model.tokenizer.why_not_new(args.word, args.vectors)
        if why:
            fail(f"--word {args.word!r}: must be a new word, e.g. \"<bw>\" ({why})", 2)
        if not any(args.word in c for c in captions):
            fail(f"no caption contains the new word {args.word!r}: give --caption with it, or --in-place-of the "
                 "phrase it stands for", 2)
    amp = model.device.type == "cuda" if args.amp is None else args.amp
    used = sum(args.word in c for c in captions) if args.command == "embedding" else len(images)
    print(f"fine-tuning {path} on {used} images from {args.images} ({args.steps} steps, batch "
          f"{args.batch_size}, lr {args.lr:g}{', mixed precision' if amp else ''}); e.g. {captions[0]!r}",
          file=sys.stderr)
    options = dict(num_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   min_snr_gamma=args.min_snr_gamma or None, seed=args.seed, amp=amp, flip=not args.no_flip)
    made = dict(base=os.path.basename(os.path.normpath(path)), images=len(images), caption=captions[0],
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    start = time.perf_counter()
    try:
        if args.command == "lora":
            state, losses = train_lora(model, images, captions, rank=args.rank, alpha=args.alpha,
                                       targets=args.targets, text_encoder=args.text_encoder, layout=args.layout,
                                       **options)
            metadata = {"ss_network_dim": str(args.rank), "ss_network_alpha": f"{args.alpha or args.rank:g}",
                        "minildm_fine_tune": dict(made, kind="lora", targets=args.targets,
                                                  text_encoder=args.text_encoder, layout=args.layout)}
            layers = sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in state)
            what = f"a rank-{args.rank} LoRA on {layers} layers"
        else:
            vectors, losses = train_word(model, images, captions, args.word, num_vectors=args.vectors,
                                         init_word=args.init_word, **options)
            state = {args.word: vectors}
            metadata = {"minildm_fine_tune": dict(made, kind="textual inversion", word=args.word,
                                                  init_word=args.init_word)}
            what = f"the word {args.word!r} ({args.vectors} vector{'s' if args.vectors > 1 else ''})"
    except ValueError as e:
        fail(str(e), 2)
    if not all(math.isfinite(x) for x in losses):
        fail("the loss became NaN or infinite: lower --lr")
    save_tensors(out, state, metadata)
    first, last = sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])
    size = os.path.getsize(out)
    size = f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    print(f"wrote {out}: {what}, {size}, {time.perf_counter() - start:.0f} s; "
          f"loss {first:.4f} -> {last:.4f} (mean of the first and last 20 steps)")
    return 0


def _image_prompt(args) -> int:
    """python -m minildm.finetune image-prompt: an image adapter for a CIFAR run, from its own training split."""
    from pathlib import Path

    from .cli import fail, find_checkpoint, load_model
    from .data import DataError
    from .evaluate import run_data

    check_training_flags(args)
    out = output_file(args)
    path = find_checkpoint(args.ckpt, args.runs_dir)
    run_dir = Path(path if os.path.isdir(path) else os.path.dirname(path))
    if not (run_dir / "config.json").is_file():
        fail(f"{path} is not a training run's folder (no config.json): an image adapter is trained on the run's "
             "own photos with its own VAE", 2)
    try:
        train, _ = run_data(run_dir, args.data_dir)
    except DataError as e:
        fail(str(e), 2)
    model, path = load_model(str(run_dir), args.runs_dir, args.device, "float32")
    amp = model.device.type == "cuda" if args.amp is None else args.amp
    print(f"training an image adapter for {path} on its {len(train)} training photos ({args.steps} steps, batch "
          f"{args.batch_size}, lr {args.lr:g}; each photo prompted with "
          f"{'another photo of its class' if args.pairing == 'class' else 'itself'})", file=sys.stderr)
    start = time.perf_counter()
    try:
        adapter, losses = train_image_adapter(model, train.images, train.labels, pairing=args.pairing,
                                              num_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                              min_snr_gamma=args.min_snr_gamma or None, seed=args.seed, amp=amp)
    except ValueError as e:
        fail(str(e), 2)
    if not all(math.isfinite(x) for x in losses):
        fail("the loss became NaN or infinite: lower --lr")
    adapter.save(out, {"minildm_fine_tune": json.dumps(dict(kind="image adapter", base=run_dir.name,
                                                            images=len(train), pairing=args.pairing,
                                                            steps=args.steps, batch_size=args.batch_size,
                                                            lr=args.lr, seed=args.seed))})
    first, last = sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])
    count = sum(p.numel() for p in adapter.parameters())
    print(f"wrote {out}: an image adapter of {count:,} numbers, {os.path.getsize(out) / 1e6:.2f} MB, "
          f"{time.perf_counter() - start:.0f} s; loss {first:.4f} -> {last:.4f} (mean of the first and last 20 "
          f"steps)\nuse it: python -m minildm.sample --ckpt {run_dir} --image-adapter {out} --image-prompt photo.png")
    return 0


def _write_example(args) -> int:
    from .cli import check_int, check_seed, check_writable_dir, fail, usage
    from .data import DataError, load_cifar10
    from PIL import Image

    check_int("--per-class", args.per_class, 1, 250)
    check_seed("--seed", args.seed)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        usage("--out", args.out, "must be a new or empty folder")
    check_writable_dir("--out", args.out)
    try:
        data = load_cifar10(args.data_dir)
    except DataError as e:
        fail(str(e))
    _, held_out = data.split(500)      # the photos the training command line holds out
    images, captions = example_set(held_out, args.per_class, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "captions.jsonl"), "w", encoding="utf-8") as f:
        for i, (image, caption) in enumerate(zip(images, captions)):
            name = f"{i:03d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(args.out, name))
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    grey = sum(c.startswith("a black and white") for c in captions)
    print(f"wrote {grey} held-out photos in black and white, {len(images) - grey} in colour and captions.jsonl "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
