"""Train a latent diffusion model from scratch: first the VAE, then the UNet and a text encoder.

    python -m minildm.train --dataset cifar                  # both stages on CIFAR-10
    python -m minildm.train --dataset shapes --preset tiny   # a CPU smoke run in minutes
    python -m minildm.train --stage ldm --vae runs/x/vae.safetensors --dataset cifar
    python -m minildm.train --resume runs/x                  # continue exactly where it stopped
    torchrun --nproc_per_node 2 -m minildm.train ...         # data parallel (gloo on CPU, nccl on GPU)

Stage 1 (`train_vae`) fits the autoencoder to images with `vae.VAELoss` (reconstruction + KL, and
optionally a patch discriminator), then measures the latent scale factor on the data (1 / std of the
latents, so the diffusion model sees unit-variance latents). Stage 2 (`train_ldm`) freezes the VAE and
trains the UNet and a small CLIP-architecture text encoder, from scratch, to predict the noise:

    tokens  = tokenizer(captions, 10% replaced by "")       caption dropout -> classifier-free guidance
    context = text_encoder(tokens)                          (B, L, D)
    z       = vae.encode(x).sample() * scale_factor         (B, C, h, w), cached once per run
    t       ~ U{0, ..., T-1},  eps ~ N(0, I)
    z_t     = sqrt(abar_t) z + sqrt(1 - abar_t) eps         schedule.q_sample
    loss    = || eps - unet(z_t, t, context) ||^2           (DDPM eq. 14, the "simple" objective)

Everything lands in runs/<name>/:

    config.json         the TrainConfig of the run (models' configs included)
    vae.safetensors     stage 1's VAE-only checkpoint (with the measured scale factor)
    model.safetensors   the newest sampleable checkpoint: UNet (+ EMA), VAE, text encoder, schedule
    state_vae.pt        everything needed to resume a stage exactly (weights, optimizers, EMA, step,
    state_ldm.pt          RNG states), a plain dict of tensors: torch.load(..., weights_only=True)
    metrics.jsonl       one JSON line per logged step (stage, step, loss, lr, images/s, ...)
    loss.png            the loss curves
    samples/            stage 1: vae_step_N.png, 8 fixed images over their reconstructions, at every
                          checkpoint; stage 2: step_N.png, sample grids for fixed prompts and seeds,
                          every --sample-every steps

Reproducibility: the data order of epoch e is a permutation drawn from (seed, e), and all randomness
of step s (timesteps, noise, caption dropout, templates, flips) comes from a generator seeded with
(seed, s). A resumed run therefore replays the same batches and noise, and a DDP run splits the very
same global batch over its processes: the loss is the mean over the global batch either way.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_module
from .clip_text import CLIPTextConfig, CLIPTextModel
from .cli import (USAGE, Parser, check_choice, check_float, check_int, check_readable_file, check_seed, check_writable_dir,
                  fail, usage)
from .convert import CheckpointError, load_checkpoint, load_module, save_checkpoint, strip_prefix
from .ldm import LatentDiffusion, to_diffusion_latents
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, PatchDiscriminator, VAEConfig, VAELoss, estimate_scale_factor


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    stage: str = "all"                      # vae | ldm | all
    vae_path: Optional[str] = None          # stage 2: a trained VAE checkpoint (default: the run's own)
    # data
    dataset: str = "shapes"                 # cifar | folder | shapes
    data_dir: Optional[str] = None          # local copy of the data (see data.py)
    num_images: Optional[int] = None        # use at most this many training images
    holdout_per_class: int = 0              # last N images of each class kept out of training
    resolution: int = 32                    # training images are resolution x resolution
    # models
    vae: dict = field(default_factory=lambda: VAEConfig.tiny().to_dict())
    unet: dict = field(default_factory=lambda: UNetConfig.tiny().to_dict())
    text_encoder: dict = field(default_factory=lambda: CLIPTextConfig.tiny().to_dict())
    schedule: dict = field(default_factory=lambda: NoiseSchedule.sd().to_dict())
    # stage 1: the VAE
    vae_steps: Optional[int] = 300          # optimizer steps (None: until --max-minutes; it may stop earlier)
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6                 # as SD's first stage
    rec_loss: str = "l1"                    # l1 | l2
    disc_start: Optional[int] = None        # step at which the patch discriminator starts (None: never)
    disc_weight: float = 0.5
    scale_batches: int = 16                 # batches of 64 images used to measure the latent scale factor
    # stage 2: UNet + text encoder
    ldm_steps: Optional[int] = 500
    batch_size: int = 32                    # global batch (over processes and accumulation steps)
    lr: float = 5e-4
    warmup_steps: int = 50                  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0                  # max global gradient norm (0: no clipping)
    grad_accum: int = 1                     # micro-batches per optimizer step
    ema_decay: float = 0.999
    caption_dropout: float = 0.1            # fraction of captions replaced by "" (for guidance)
    min_snr_gamma: Optional[float] = None   # weight the loss by min(SNR, gamma) / SNR (None: plain MSE)
    cache_latents: bool = True              # encode the data set once (no flips) instead of every step
    # both stages
    max_minutes: Optional[float] = None     # wall-clock budget of the whole run (data, both stages, caching)
    vae_share: float = 0.3                  # the part of max_minutes stage 1 gets when both stages run
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"                  # weights' dtype: float32 | bfloat16 | float16
    amp: bool = False                       # CUDA autocast (bfloat16 where supported)
    compile: bool = False                   # torch.compile the UNet
    log_every: int = 10
    save_every: int = 200
    sample_every: int = 0                   # 0: sample only at the end of stage 2
    sample_steps: int = 25                  # DDIM steps for the sample grids
    guidance_scale: float = 3.0
    probe_per_class: int = 10               # samples per class for the class probe at every grid (0: off)
    evaluate_per_class: int = 0             # after a run with classes: python -m minildm.evaluate with this n
    run_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        """A CPU smoke run: VAE 43,711 (32px -> 16x16x4), UNet 1,055,044, text encoder 1,600,672 parameters."""
        return cls(**overrides)

    @classmethod
    def cifar(cls, **overrides) -> "TrainConfig":
        """CIFAR-10 on a consumer GPU: VAE 2,147,451 (32px -> 8x8x8), UNet 35,062,152 (UNetConfig.cifar
        with a 256-wide context), text encoder 15,816,192 parameters (32 positions); step budgets."""
        text = CLIPTextConfig.small()
        unet = UNetConfig.cifar()
        unet.context_dim = text.width
        base = dict(vae=VAEConfig.cifar().to_dict(), unet=unet.to_dict(), text_encoder=text.to_dict(),
                    vae_steps=20000, vae_batch_size=16, vae_lr=1e-3, rec_loss="l1",
                    ldm_steps=100000, batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.9999,
                    holdout_per_class=500, log_every=25, save_every=1000, sample_every=2000,
                    sample_steps=50, guidance_scale=7.5)
        base.update(overrides)
        z = VAEConfig.from_dict(base["vae"]).z_channels
        base["unet"] = dict(base["unet"], in_channels=z, out_channels=z)   # the UNet denoises the VAE's latents
        return cls(**base)


    @classmethod
    def cifar_cpu(cls, **overrides) -> "TrainConfig":
        """CIFAR-10 in one hour on a CPU: the `cifar` VAE and text encoder, UNetConfig.cifar_cpu
        (8,521,352 parameters with 8 latent channels), batch 64, min-SNR-5 loss weights; 60 minutes in all, 30% of them for the
        VAE (bench/RESULTS.md)."""
        base = dict(unet=UNetConfig.cifar_cpu().to_dict(), vae_steps=None, ldm_steps=None, batch_size=64,
                    lr=5e-4, warmup_steps=100, ema_decay=0.999, min_snr_gamma=5.0, max_minutes=60.0,
                    vae_share=0.3, save_every=500, sample_every=1000)
        base.update(overrides)
        return cls.cifar(**base)


PRESETS = {"tiny": TrainConfig.tiny, "cifar": TrainConfig.cifar, "cifar-cpu": TrainConfig.cifar_cpu}


def describe_plan(cfg: TrainConfig, preset: str, reason: str) -> str:
    """The first lines a run prints: what it will train, how big, for how long, and why."""
    unet, text = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    n_unet = sum(p.numel() for p in UNet(unet).parameters())
    budget = (f"{cfg.max_minutes:g} minutes in all" + (f" ({cfg.max_minutes * cfg.vae_share:g} for the VAE, "
              "the rest for the diffusion model, latent caching included)" if cfg.stage == "all" else "")
              if cfg.max_minutes else f"{cfg.vae_steps} VAE steps, {cfg.ldm_steps} diffusion steps")
    return (f"plan: preset {preset} ({reason}); {cfg.dataset} at {cfg.resolution}px, UNet width "
            f"{unet.model_channels} ({n_unet / 1e6:.1f}M parameters), text encoder {text.width} wide, "
            f"batch {cfg.batch_size}, lr {cfg.lr:g}, device {cfg.device}; {budget}.\n"
            f"      --preset, --max-minutes and the other flags change it; files go to {cfg.run_dir}/")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during a training loop: finish the current step, save a resumable
    state, then stop. Outside a loop, or at the second signal, they interrupt at once as usual."""

    def __init__(self):
        self.signal: Optional[str] = None        # the name of the signal that asked to stop
        self.armed = False                       # inside a loop that can save its state
        self.saved: Optional[str] = None         # what the stopped stage wrote, for the final message

    def install(self) -> None:
        def handler(signum, frame):
            if not self.armed or self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


STOP = StopRequest()


# ----------------------------------------------------------------------------------------------
# Processes, devices, randomness


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is available; use --device cpu")
        if dist.world > 1 and cfg.device == "cuda":
            return torch.device("cuda", dist.local_rank)
    return torch.device(cfg.device)


def step_generator(seed: int, step: int, stage: str, rank: int = 0) -> torch.Generator:
    """The generator all randomness of one training step is drawn from."""
    stage_id = {"vae": 1, "ldm": 2, "scale": 3, "cache": 4}[stage]
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stage_id) * 4099 + rank)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The data indices of step `step`: consecutive slices of per-epoch permutations (last partial
    batch of an epoch dropped), so the order depends only on (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    if n < batch_size:  # tiny data sets: wrap around
        return perm.repeat(batch_size // n + 1)[:batch_size]
    return perm[j * batch_size:(j + 1) * batch_size]


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from 1 to `min_ratio` as progress goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# EMA and the trained pair


class EMA:
    """An exponential moving average of a model's parameters: ema = decay * ema + (1 - decay) * param.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as the original
    LitEma), so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = model.state_dict()
        floats = [(self.shadow[k], v.float()) for k, v in state.items() if v.is_floating_point()]
        torch._foreach_lerp_([s for s, _ in floats], [v for _, v in floats], 1 - d)  # shadow += (1-d)(v - shadow)
        for k, v in state.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(p.dtype) for (k, v), p in
                               zip(self.shadow.items(), model.state_dict().values())})
        return model


class Denoiser(nn.Module):
    """The trained pair as one module (one DDP wrapper): tokens -> context, then the UNet's eps."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, z_t, t, tokens):
        # Rows of a batch often share a caption (CIFAR-10 has about sixty different ones): encode each
        # distinct caption once and give its context to every row that has it. Same loss, same gradients.
        distinct, row = torch.unique(tokens, dim=0, return_inverse=True)    # (U, L), (B,)
        return self.unet(z_t, t, self.text_encoder(distinct)[row])


def diffusion_loss(denoiser, schedule: NoiseSchedule, z: torch.Tensor, tokens: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, min_snr_gamma: Optional[float] = None) -> torch.Tensor:
    """The simple objective: mean squared error between the noise and the model's estimate of it.

    With `min_snr_gamma`, each example's error is weighted by min(SNR(t), gamma) / SNR(t) (Hang et al.,
    2023, "min-SNR-gamma" for an eps-predicting model): the nearly clean timesteps, whose noise is easy
    to tell and whose gradients would dominate, count less; the noisy ones, where the layout and the
    class of the image are decided, count fully.
    """
    z_t = schedule.q_sample(z, t, noise)
    eps_pred = denoiser(z_t, t, tokens)
    if min_snr_gamma is None:
        return F.mse_loss(eps_pred.float(), noise.float())
    snr = schedule.snr(t.cpu()).to(z.device)                                      # (B,)
    per_example = (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)    # (B,)
    return (per_example * snr.clamp(max=min_snr_gamma) / snr).mean()


def drop_captions(captions: list, p: float, generator: torch.Generator) -> list:
    """Replace a fraction p of captions by the empty prompt, which guidance uses as 'unconditional'."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# ----------------------------------------------------------------------------------------------
# Run folder: config, metrics, plots, checkpoints


class Run:
    """Files of one run; every write happens on the main process only."""

    def __init__(self, run_dir: str, main: bool = True):
        self.dir = Path(run_dir)
        self.main = main
        if main:
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    @property
    def model_path(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def vae_path(self) -> Path:
        return self.dir / "vae.safetensors"

    def state_path(self, stage: str) -> Path:
        return self.dir / f"state_{stage}.pt"

    def write_config(self, cfg: TrainConfig) -> None:
        if self.main:
            atomic_write_text(self.dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def metrics(self) -> list:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, stage: str, step: int) -> None:
        """Forget records of `stage` after `step` (a resumed run logs them again)."""
        if not self.main:
            return
        kept = [r for r in self.metrics() if r.get("stage") != stage or r["step"] <= step]
        atomic_write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def plot_losses(self) -> None:
        if self.main:
            plot_losses(self.metrics(), self.dir / "loss.png")

    def save_state(self, stage: str, state: dict) -> None:
        if self.main:
            path = self.state_path(stage)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)

    def load_state(self, stage: str) -> Optional[dict]:
        path = self.state_path(stage)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_losses(records: list, path) -> None:
    """One panel per stage: the logged loss against the step, with a smoothed curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "ldm") if any(r.get("stage") == s for r in records)]
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r.get("stage") == stage and "loss" in r]
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        if len(losses) > 4:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
        ax.set_title({"vae": "stage 1: VAE (rec + KL)", "ldm": "stage 2: noise prediction (MSE)"}[stage])
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Building models


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SystemExit(f"error: --dtype must be float32, bfloat16 or float16, not {name!r}") from None


def load_vae(path, device="cpu") -> tuple:
    """(AutoencoderKL, scale_factor or None) from a minildm checkpoint with a VAE in it."""
    ckpt = load_checkpoint(path)
    if ckpt.vae is None or not ckpt.meta or not ckpt.meta.get("vae"):
        raise SystemExit(f"error: {path} has no minildm VAE (train one with --stage vae)")
    vae = AutoencoderKL(VAEConfig.from_dict(ckpt.meta["vae"]))
    load_module("vae", vae, ckpt.vae, dtype=torch.float32, device=device)
    return vae, ckpt.meta.get("scale_factor")


def load_dataset(cfg: TrainConfig) -> tuple:
    """(train, held_out) as configured; held_out may be empty."""
    data = data_module.load_dataset(cfg.dataset, cfg.data_dir, cfg.resolution, None if
                                    cfg.dataset != "shapes" else cfg.num_images, cfg.seed)
    train, held = data.split(cfg.holdout_per_class)
    if cfg.num_images is not None and cfg.dataset != "shapes" and cfg.num_images < len(train):
        train = train.subset(torch.arange(cfg.num_images))
    return train, held


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def _check_finite(loss: torch.Tensor, stage: str, step: int, run: Run, last_saved: Optional[int]):
    if not torch.isfinite(loss).all():
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {run.dir}" if last_saved is not None
                else "no checkpoint was written yet")
        raise TrainingDiverged(f"{stage} loss became {loss.item()} at step {step}; training stopped and "
                               f"{kept}. Try a lower learning rate, --grad-clip, or float32.")


class Budget:
    """Stops a stage at max_steps or when max_minutes (summed over resumes) have passed.

    The clock runs from `started` (a time.perf_counter() value, default now), so work done before the
    loop, like loading the data or caching latents, is paid from the same budget.
    """

    def __init__(self, max_steps: Optional[int], max_minutes: Optional[float], elapsed: float = 0.0,
                 started: Optional[float] = None):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.start = (time.perf_counter() if started is None else started) - elapsed
        self.costs: dict = {}  # seconds the work after the last step takes (a save, a sample grid), as measured

    @contextlib.contextmanager
    def reserving(self, name: str):
        """Time a piece of work the stage also does after its last step, and keep that much time for it."""
        began = time.perf_counter()
        yield
        self.costs[name] = time.perf_counter() - began

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = 0.0 if self.max_steps is None else step / max(1, self.max_steps)
        if self.max_minutes:
            p = max(p, self.elapsed / (60 * self.max_minutes))
        return p

    def left(self) -> str:
        """Wall-clock time left in the minutes budget, for the progress bar ('' without one)."""
        if not self.max_minutes:
            return ""
        seconds = max(0, int(60 * self.max_minutes - self.elapsed))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def done(self, step: int, dist: Dist) -> bool:
        stop = self.reached(step) or STOP.requested
        if dist.world > 1:  # every process must stop at the same step
            import torch.distributed as tdist
            flag = torch.tensor([1.0 if stop else 0.0])
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def reached(self, step: int) -> bool:
        """Whether the step count or the minutes are used up (on this process)."""
        reserve = sum(self.costs.values())  # so that the final save and grid end within the minutes too
        return ((self.max_steps is not None and step >= self.max_steps) or
                (self.max_minutes is not None and self.elapsed + reserve >= 60 * self.max_minutes))


def _progress_bar(total: Optional[int], desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                unit="step", smoothing=0.1)


def _mean_over_processes(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world == 1:
        return value
    import torch.distributed as tdist
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value / dist.world


def _all_reduce_grads(module: nn.Module, dist: Dist) -> None:
    """Average gradients over processes by hand (for the discriminator, updated outside DDP)."""
    if dist.world == 1:
        return
    import torch.distributed as tdist
    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= dist.world


# ----------------------------------------------------------------------------------------------
# Stage 1: the VAE


@torch.no_grad()
def psnr(vae: AutoencoderKL, data, batch_size: int = 128, device="cpu") -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of the VAE's reconstructions (posterior mode) of `data`."""
    vae.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data_module.to_float(data.images[i:i + batch_size]).to(device)
        x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        total += (-10 * torch.log10(mse)).sum().item()
        n += len(x)
    return total / max(1, n)


def stage_minutes(cfg: TrainConfig, stage: str, vae_seconds: float = 0.0) -> Optional[float]:
    """The part of the run's --max-minutes a stage may use: when both stages run, stage 1 gets
    `vae_share` of it and stage 2 what stage 1 left (data loading and latent caching included)."""
    if cfg.max_minutes is None or cfg.stage != "all":
        return cfg.max_minutes
    if stage == "vae":
        return cfg.max_minutes * cfg.vae_share
    return max(cfg.max_minutes - vae_seconds / 60, 0.5)


def train_vae(cfg: TrainConfig, resume: bool = False, data=None, callback=None,
              started: Optional[float] = None) -> tuple:
    """Stage 1: train the VAE on the images; returns (vae, scale_factor) and writes vae.safetensors.

    `callback(stage, step, logs)` runs after every step; when it returns True the stage stops there
    (its state is saved, so `resume=True` continues it), and (vae, None) is returned. `started`: the
    perf_counter() time the run began, so that loading the data counts against the budget.
    """
    started = time.perf_counter() if started is None else started
    dist = init_distributed(cfg.device)
    device = resolve_device(cfg, dist)
    run = Run(cfg.run_dir, dist.main)
    run.write_config(cfg)
    train, held = data if data is not None else load_dataset(cfg)
    vae_cfg = VAEConfig.from_dict(cfg.vae)
    if train.resolution % vae_cfg.downsample_factor:
        raise SystemExit(f"error: resolution {train.resolution} does not divide by the VAE's factor "
                         f"{vae_cfg.downsample_factor}")

    torch.manual_seed(cfg.seed)
    # Channels-last activations suit oneDNN's and cuDNN's convolutions: 13% faster here on the CPU.
    vae = AutoencoderKL(vae_cfg).to(device, memory_format=torch.channels_last)
    disc = PatchDiscriminator(vae_cfg.in_channels, n_layers=2).to(device) if cfg.disc_start is not None else None
    loss_fn = VAELoss(kl_weight=cfg.kl_weight, rec_loss=cfg.rec_loss, discriminator=disc,
                      disc_start=cfg.disc_start or 0, disc_weight=cfg.disc_weight)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.vae_lr, betas=(0.5, 0.9)) if disc else None

    step, elapsed, last_saved = 0, 0.0, None
    state = run.load_state("vae") if resume else None
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["optimizer_d"])
        set_rng_state(state["rng"])
        step, elapsed, last_saved = int(state["step"]), float(state["elapsed"]), int(state["step"])
        if state.get("done"):
            scale = float(state["scale_factor"])
            vae_cfg.scale_factor = scale
            return vae.eval(), scale
        run.truncate_metrics("vae", step)

    model = vae
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(vae, device_ids=[device.index] if device.type == "cuda" else None)
    local = cfg.vae_batch_size // dist.world
    if local * dist.world != cfg.vae_batch_size:
        raise SystemExit(f"error: --vae-batch-size {cfg.vae_batch_size} must divide by {dist.world} processes")

    def save(done=False, scale=None):
        payload = {"stage": "vae", "step": step, "elapsed": budget.elapsed, "done": done,
                   "vae": vae.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}
        if disc is not None:
            payload.update(discriminator=disc.state_dict(), optimizer_d=opt_d.state_dict())
        if scale is not None:
            payload["scale_factor"] = scale
        run.save_state("vae", payload)
        if dist.main:
            save_checkpoint(run.vae_path, vae=vae, scale_factor=scale)
            run.plot_losses()
            reconstruction_grid(vae, fixed_images, run.dir / "samples" / f"vae_step_{step:07d}.png")

    # The same 8 images at every checkpoint (held-out ones when there are), originals over reconstructions.
    fixed_images = (held if len(held) else train).images[:8]
    budget = Budget(cfg.vae_steps, stage_minutes(cfg, "vae"), elapsed, started)
    bar = _progress_bar(cfg.vae_steps, "stage 1 (VAE)", dist.main, initial=step)
    vae.train()
    t_log, n_images = time.perf_counter(), 0
    STOP.armed = True
    while not budget.done(step, dist):
        g = step_generator(cfg.seed, step, "vae")
        idx = global_batch_indices(len(train), cfg.vae_batch_size, cfg.seed, step)
        x, _ = train.batch(idx, g)
        x = x[dist.rank * local:(dist.rank + 1) * local].to(device, memory_format=torch.channels_last)
        g_rank = step_generator(cfg.seed, step, "vae", rank=1 + dist.rank)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = cfg.vae_lr * lr_factor(step, 0, budget.progress(step), cfg.min_lr_ratio)

        with _autocast(cfg, device):
            x_rec, posterior = model(x, generator=g_rank)
            loss, logs = loss_fn(x, x_rec.float(), posterior, step, last_layer=vae.decoder.conv_out.weight)
        _check_finite(_mean_over_processes(loss.detach(), dist), "VAE", step, run, last_saved)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and loss_fn.discriminator_active(step):
            loss_d, logs_d = loss_fn.discriminator_loss(x, x_rec.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            _all_reduce_grads(disc, dist)
            opt_d.step()
            logs.update(logs_d)
        step += 1
        n_images += cfg.vae_batch_size
        bar.update(1)

        if step % cfg.log_every == 0 or step == 1:
            mean_loss = _mean_over_processes(torch.tensor(logs["loss"]), dist).item()
            now = time.perf_counter()
            rate = n_images / max(now - t_log, 1e-9)
            t_log, n_images = now, 0
            rec_pe = logs["rec_per_element"]
            run.log({"stage": "vae", "step": step, "loss": mean_loss, "rec_per_element": rec_pe,
                     "kl": logs["kl"], "lr": opt.param_groups[0]["lr"], "images_per_s": rate,
                     "elapsed_s": budget.elapsed, **{k: logs[k] for k in ("g", "d_loss") if k in logs}})
            bar.set_postfix(loss=f"{mean_loss:.4g}", rec=f"{rec_pe:.4f}", img_s=f"{rate:.0f}",
                            **({"budget_left": budget.left()} if budget.max_minutes else {}))
        if cfg.save_every and step % cfg.save_every == 0:
            save()
            last_saved = step
        if callback is not None and callback("vae", step, logs):
            bar.close()
            save()
            return vae, None
    bar.close()
    STOP.armed = False
    if STOP.requested:
        save()
        STOP.saved = f"stage 1 (VAE) at step {step}: {run.state_path('vae')} and {run.vae_path}"
        return vae, None
    if step % cfg.log_every and step > 1:  # the last step, when it fell between two logs
        run.log({"stage": "vae", "step": step, "loss": _mean_over_processes(torch.tensor(logs["loss"]), dist).item(),
                 "rec_per_element": logs["rec_per_element"], "kl": logs["kl"], "elapsed_s": budget.elapsed})

    scale = measure_scale_factor(vae, train, cfg, device)
    vae_cfg.scale_factor = scale
    record = {"stage": "vae", "step": step, "event": "done", "scale_factor": scale,
              "elapsed_s": budget.elapsed}
    if len(held):
        record["held_out_psnr"] = psnr(vae, held, device=device)
    record["train_psnr_first_1000"] = psnr(vae, train.subset(torch.arange(min(1000, len(train)))), device=device)
    run.log(record)
    save(done=True, scale=scale)
    if dist.main:
        print(f"stage 1 done at step {step}: scale factor {scale:.4f}" +
              (f", held-out PSNR {record['held_out_psnr']:.2f} dB" if "held_out_psnr" in record else ""))
    return vae.eval(), scale


@torch.no_grad()
def measure_scale_factor(vae: AutoencoderKL, data, cfg: TrainConfig, device) -> float:
    """1 / std of the latents of `scale_batches` batches of 64 images (the same in every process)."""
    vae.eval()
    g = step_generator(cfg.seed, 0, "scale")
    batches = []
    for i in range(cfg.scale_batches):
        idx = torch.randint(len(data), (64,), generator=g)
        batches.append(data.batch(idx, g)[0].to(device))
    return estimate_scale_factor(vae, batches, generator=g)


# ----------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder on the frozen VAE's latents


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, data, device, batch_size: int = 256) -> tuple:
    """(mean, std) of q(z|x) for every image (no flips), so each step only samples z = mean + std * eps."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(data), batch_size):
        posterior = vae.encode(data_module.to_float(data.images[i:i + batch_size]).to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def build_pipeline(unet, vae, text_encoder, tokenizer, schedule, scale_factor):
    """The composed model that samples (ldm.LatentDiffusion)."""
    return LatentDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           schedule=schedule, scale_factor=scale_factor)


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, images: torch.Tensor, path) -> None:
    """Originals (top row) over their reconstructions (posterior mode), as a PNG."""
    import torchvision
    was_training = vae.training
    vae.eval()
    x = data_module.to_float(images).to(next(vae.parameters()).device)
    x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(torch.cat([x, x_rec]).float().cpu() / 2 + 0.5, path, nrow=len(x), padding=1)
    vae.train(was_training)


@torch.no_grad()
def sample_grid(pipeline, prompts: list, path, num_steps: int, guidance_scale: float, seed: int = 0,
                resolution: Optional[int] = None) -> torch.Tensor:
    """One image per prompt from fixed noise (`seed`), saved as a grid; returns images (B, 3, H, W) in [0, 1]."""
    import torchvision
    x = pipeline.generate(list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                          sampler="ddim", height=resolution, width=resolution)
    if path is not None:
        torchvision.utils.save_image(x.float().cpu(), path, nrow=min(len(prompts), 5), padding=1)
    return x


def fit_class_probe(vae: AutoencoderKL, train_latents: torch.Tensor, train, held, scale_factor: float,
                    device) -> tuple:
    """(LatentProbe on the training latents, its accuracy on the held-out images' latents)."""
    from .evaluate import LatentProbe

    probe = LatentProbe(to_diffusion_latents(train_latents, scale_factor), train.labels, len(train.class_names))
    held_latents = to_diffusion_latents(cache_latents(vae, held, device)[0], scale_factor)
    return probe, probe.accuracy(held_latents, held.labels)


@torch.no_grad()
def probe_samples(pipeline, probe, class_names, per_class: int, cfg: TrainConfig) -> float:
    """How often the latents sampled for "a photo of a <class>" are read as that class by the probe."""
    from .evaluate import class_prompt

    z = pipeline.generate([class_prompt(c) for c in class_names], num_images=per_class, seed=cfg.seed,
                          num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, output_type="latent")
    labels = torch.arange(len(class_names)).repeat_interleave(per_class)
    return probe.accuracy(z.float().cpu(), labels)


def train_ldm(cfg: TrainConfig, vae: Optional[AutoencoderKL] = None, scale_factor: Optional[float] = None,
              resume: bool = False, data=None, vae_path: Optional[str] = None, callback=None,
              started: Optional[float] = None):
    """Stage 2: train the UNet and the text encoder on the frozen VAE's latents.

    The VAE comes from `vae`, from `vae_path`, or from the run's vae.safetensors. Returns the
    composed `LatentDiffusion` with the EMA weights of the UNet and text encoder, and writes
    model.safetensors. `callback(stage, step, logs)` runs after every step and stops the stage
    (saving its state) by returning True; then None is returned. `started`: as for `train_vae`.
    """
    started = time.perf_counter() if started is None else started
    dist = init_distributed(cfg.device)
    device = resolve_device(cfg, dist)
    run = Run(cfg.run_dir, dist.main)
    run.write_config(cfg)
    train, held = data if data is not None else load_dataset(cfg)
    if vae is None:
        path = vae_path or run.vae_path
        if not Path(path).exists():
            raise SystemExit(f"error: no VAE at {path}; train one first (--stage vae) or pass --vae PATH")
        vae, scale_factor = load_vae(path, device)
    vae = vae.to(device).eval().requires_grad_(False)
    if not scale_factor:
        scale_factor = measure_scale_factor(vae, train, cfg, device)
    cfg.vae = vae.cfg.to_dict()
    # The UNet denoises this VAE's latents, whatever preset trained it (--vae): its channels in and out.
    cfg.unet = dict(cfg.unet, in_channels=vae.cfg.z_channels, out_channels=vae.cfg.z_channels)
    run.write_config(cfg)

    wdtype = dtype_of(cfg.dtype)
    torch.manual_seed(cfg.seed)
    unet_cfg, text_cfg = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    if unet_cfg.context_dim != text_cfg.width:
        raise SystemExit(f"error: the UNet reads a {unet_cfg.context_dim}-wide context but the text "
                         f"encoder is {text_cfg.width} wide")
    unet = UNet(unet_cfg).to(device, wdtype)
    text_encoder = CLIPTextModel(text_cfg).to(device, wdtype)
    tokenizer = CLIPTokenizer.default(context_length=text_cfg.context_length)
    schedule = NoiseSchedule.from_dict(cfg.schedule)
    denoiser = Denoiser(unet, text_encoder)
    # No weight decay on biases, norms and embeddings (the usual AdamW split).
    decay, no_decay = [], []
    for name, p in denoiser.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    # One average of the pair: the EMA UNet learned to read the context of the EMA text encoder.
    ema = EMA(denoiser, cfg.ema_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda" and
                                  not torch.cuda.is_bf16_supported())

    step, elapsed, last_saved = 0, 0.0, None
    vae_state = run.load_state("vae") if cfg.stage == "all" and cfg.max_minutes else None
    minutes = stage_minutes(cfg, "ldm", float(vae_state["elapsed"]) if vae_state else 0.0)
    state = run.load_state("ldm") if resume else None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        saved = state["ema"]
        if not any(k.startswith("unet.") for k in saved["shadow"]):  # from before the EMA covered the text encoder
            shadow = {"text_encoder." + k: v.float() for k, v in text_encoder.state_dict().items()}
            saved = dict(saved, shadow={**shadow, **{"unet." + k: v for k, v in saved["shadow"].items()}})
        ema.load_state_dict(saved)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, elapsed, last_saved = int(state["step"]), float(state["elapsed"]), int(state["step"])
        scale_factor = float(state["scale_factor"])
        run.truncate_metrics("ldm", step)

    model = denoiser
    if cfg.compile:
        model = torch.compile(model)
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    micro = cfg.batch_size // (dist.world * cfg.grad_accum)
    if micro * dist.world * cfg.grad_accum != cfg.batch_size:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must divide by processes ({dist.world}) "
                         f"x --grad-accum ({cfg.grad_accum})")

    latents = cache_latents(vae, train, device) if cfg.cache_latents else None
    prompts = train.prompts(10)
    probe = None
    if dist.main and latents is not None and cfg.probe_per_class and train.class_names and len(held):
        probe, probe_real = fit_class_probe(vae, latents[0], train, held, scale_factor, device)

    def ema_pipeline():
        averaged = ema.copy_to(copy.deepcopy(denoiser)).eval()
        return build_pipeline(averaged.unet, vae, averaged.text_encoder, tokenizer, schedule, scale_factor)

    def save(final=False):
        payload = {"stage": "ldm", "step": step, "elapsed": budget.elapsed,
                   "done": final, "scale_factor": scale_factor, "unet": unet.state_dict(),
                   "text_encoder": text_encoder.state_dict(), "optimizer": opt.state_dict(),
                   "ema": ema.state_dict(), "rng": rng_state(), "scaler": scaler.state_dict()}
        run.save_state("ldm", payload)
        if dist.main:
            vae.cfg.scale_factor = scale_factor
            averaged = {k: v.to(wdtype) for k, v in ema.shadow.items()}
            save_checkpoint(run.model_path, unet=unet, vae=vae, text_encoder=text_encoder,
                            ema_unet_state=strip_prefix(averaged, "unet."),
                            ema_text_encoder_state=strip_prefix(averaged, "text_encoder."),
                            schedule=schedule, scale_factor=scale_factor)
            run.plot_losses()

    def samples():
        if not dist.main or not prompts:
            return
        pipeline = ema_pipeline()
        sample_grid(pipeline, prompts, run.dir / "samples" / f"step_{step:07d}.png",
                    cfg.sample_steps, cfg.guidance_scale, seed=cfg.seed, resolution=train.resolution)
        if probe is not None:
            accuracy = probe_samples(pipeline, probe, train.class_names, cfg.probe_per_class, cfg)
            run.log({"stage": "ldm", "step": step, "event": "probe", "probe_samples": accuracy,
                     "probe_real": probe_real, "elapsed_s": budget.elapsed})
            bar.write(f"step {step}: the class probe reads the prompted class in {accuracy:.0%} of samples "
                      f"({probe_real:.0%} of real held-out images, {1 / len(train.class_names):.0%} by chance)")

    budget = Budget(cfg.ldm_steps, minutes, elapsed, started)
    bar = _progress_bar(cfg.ldm_steps, "stage 2 (UNet + text)", dist.main, initial=step)
    denoiser.train()
    t_log, n_images = time.perf_counter(), 0
    STOP.armed = True
    while not budget.done(step, dist):
        g = step_generator(cfg.seed, step, "ldm")
        idx = global_batch_indices(len(train), cfg.batch_size, cfg.seed, step)
        # Draw everything for the whole global batch, then take this process's rows: the result
        # does not depend on how the batch is split over processes and accumulation steps.
        if latents is not None:
            mean, std = latents[0][idx], latents[1][idx]
            captions = [train.caption(int(i), g) for i in idx]
            z = mean + std * torch.randn(mean.shape, generator=g)
        else:
            x, captions = train.batch(idx, g)
            with torch.no_grad():
                z = vae.encode(x.to(device)).sample(g).cpu()
        z = to_diffusion_latents(z, scale_factor)
        captions = drop_captions(captions, cfg.caption_dropout, g)
        t = torch.randint(0, schedule.num_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, budget.progress(step), cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            start = (k * dist.world + dist.rank) * micro
            rows = slice(start, start + micro)
            tokens = tokenizer(captions[rows]).to(device)
            sync = k == cfg.grad_accum - 1 or dist.world == 1
            with (model.no_sync() if not sync else nullcontext()), _autocast(cfg, device):
                loss = diffusion_loss(model, schedule, z[rows].to(device, wdtype), tokens,
                                      t[rows].to(device), noise[rows].to(device, wdtype), cfg.min_snr_gamma)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        mean_loss = _mean_over_processes(loss_sum, dist)
        _check_finite(mean_loss, "diffusion", step, run, last_saved)
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(denoiser)
        step += 1
        n_images += cfg.batch_size
        bar.update(1)

        if step % cfg.log_every == 0 or step == 1:
            now = time.perf_counter()
            rate = n_images / max(now - t_log, 1e-9)
            t_log, n_images = now, 0
            run.log({"stage": "ldm", "step": step, "loss": mean_loss.item(), "lr": lr,
                     "grad_norm": float(grad_norm), "images_per_s": rate, "elapsed_s": budget.elapsed})
            bar.set_postfix(loss=f"{mean_loss.item():.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.2e}",
                            **({"budget_left": budget.left()} if budget.max_minutes else {}))
        if cfg.save_every and step % cfg.save_every == 0:
            with budget.reserving("save"):
                save()
            last_saved = step
        if cfg.sample_every and step % cfg.sample_every == 0:
            with budget.reserving("samples"):
                samples()
        if callback is not None and callback("ldm", step, {"loss": mean_loss.item(), "lr": lr}):
            break
    bar.close()
    if step % cfg.log_every and step > 1:  # the last step, when it fell between two logs
        run.log({"stage": "ldm", "step": step, "loss": mean_loss.item(), "lr": lr, "elapsed_s": budget.elapsed})
    STOP.armed = False
    final = budget.reached(step)
    save(final=final)
    if STOP.requested:
        STOP.saved = f"stage 2 (UNet + text) at step {step}: {run.state_path('ldm')} and {run.model_path}"
    if final:
        samples()
    if not final:
        return None
    if dist.main:
        print(f"stage 2 done at step {step}; checkpoint {run.model_path}")
    return ema_pipeline()


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minildm.train",
                                description="Train a text-to-image latent diffusion model from scratch "
                                            "(stage 1: VAE, stage 2: UNet + text encoder).")
    p.add_argument("--dataset", choices=data_module.DATASETS, default=None,
                   help="training data: cifar (CIFAR-10 with template captions), folder (your images), "
                        "shapes (generated, no download); default cifar")
    p.add_argument("--data-dir", default=None,
                   help="local data: CIFAR-10 archive/folder or ImageFolder tree (folder or .tar.gz), or your image folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model sizes and budgets: tiny (a smoke run), cifar-cpu (one hour on a CPU) or "
                        "cifar (a consumer GPU); default for --dataset cifar: cifar on a CUDA GPU, "
                        "else cifar-cpu; tiny for other data sets")
    p.add_argument("--stage", choices=("vae", "ldm", "all"), default=None,
                   help="train the VAE, the latent diffusion model, or both in turn (default all; "
                        "with --resume, the stage(s) the run was started with)")
    p.add_argument("--vae", default=None, help="stage 2: start from this trained VAE checkpoint")
    p.add_argument("--name", default=None, help="run name: files go to <runs-dir>/<name>/")
    p.add_argument("--runs-dir", default="runs", help="folder holding the runs")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (or run name) exactly where it stopped")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per stage")
    p.add_argument("--vae-steps", type=int, default=None, help="stage 1 steps (overrides --max-steps)")
    p.add_argument("--ldm-steps", type=int, default=None, help="stage 2 steps (overrides --max-steps)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of the whole run (data loading, both stages, latent caching); "
                        "with both stages the VAE gets --vae-share of it")
    p.add_argument("--vae-share", type=float, default=None,
                   help="fraction of --max-minutes for stage 1 when both stages run (default 0.3)")
    p.add_argument("--num-images", type=int, default=None, help="train on at most this many images")
    p.add_argument("--holdout-per-class", type=int, default=None,
                   help="keep the last N images of every class out of training (for evaluation)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels")
    p.add_argument("--unet-channels", type=int, default=None,
                   help="override the preset UNet's model_channels (e.g. 64 for a CPU budget)")
    p.add_argument("--batch-size", type=int, default=None, help="stage 2 global batch size")
    p.add_argument("--vae-batch-size", type=int, default=None, help="stage 1 global batch size")
    p.add_argument("--lr", type=float, default=None, help="stage 2 peak learning rate (AdamW)")
    p.add_argument("--vae-lr", type=float, default=None, help="stage 1 peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="stage 2 linear warm-up steps")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=None, help="decay of the UNet's EMA weights")
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="fraction of empty captions, for classifier-free guidance")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="weight the diffusion loss by min(SNR, gamma) / SNR (cifar-cpu: 5; 0 turns it off: plain MSE)")
    p.add_argument("--disc-start", type=int, default=None,
                   help="stage 1: switch the patch discriminator on at this step (default: no discriminator)")
    p.add_argument("--no-cache-latents", action="store_true",
                   help="encode images every step (with flips) instead of caching latents once")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="weights' dtype: float32 (default), bfloat16, float16")
    p.add_argument("--amp", action="store_true", help="CUDA mixed precision (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet + text encoder")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data order and noise")
    p.add_argument("--log-every", type=int, default=None, help="log metrics every N steps")
    p.add_argument("--save-every", type=int, default=None, help="write checkpoints every N steps")
    p.add_argument("--sample-every", type=int, default=None,
                   help="save a sample grid every N steps of stage 2 (0: only at the end)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for sample grids")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale for sample grids")
    p.add_argument("--probe-per-class", type=int, default=None,
                   help="samples per class for the class probe logged with every grid (0: off)")
    p.add_argument("--evaluate", type=int, default=None, metavar="N",
                   help="when a run on CIFAR-10 ends, score N samples per class with python -m minildm.evaluate")
    return p


_OVERRIDES = {"num_images": "num_images", "holdout_per_class": "holdout_per_class",
              "resolution": "resolution", "batch_size": "batch_size", "vae_batch_size": "vae_batch_size",
              "lr": "lr", "vae_lr": "vae_lr", "warmup_steps": "warmup_steps", "grad_accum": "grad_accum",
              "grad_clip": "grad_clip", "ema_decay": "ema_decay", "caption_dropout": "caption_dropout",
              "disc_start": "disc_start", "device": "device", "dtype": "dtype", "seed": "seed",
              "log_every": "log_every", "save_every": "save_every", "sample_every": "sample_every",
              "sample_steps": "sample_steps", "guidance": "guidance_scale", "max_minutes": "max_minutes",
              "vae_share": "vae_share", "min_snr_gamma": "min_snr_gamma", "probe_per_class": "probe_per_class", "evaluate": "evaluate_per_class",
              "data_dir": "data_dir"}


def config_from_args(args) -> tuple:
    """(TrainConfig, plan): the saved config when resuming, else the preset that suits the machine
    with the flags applied; plan says in words what was chosen and why."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").exists():
            run_dir = Path(args.runs_dir) / args.resume
        if not (run_dir / "config.json").exists():
            usage("--resume", args.resume, f"is not a run (no config.json there or in {args.runs_dir}/)")
        try:
            cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        except (ValueError, TypeError) as e:
            fail(f"--resume {args.resume}: its config.json cannot be read ({type(e).__name__})")
        cfg.run_dir = str(run_dir)
        plan = f"resuming {run_dir}: the run's own config.json"
    else:
        dataset = args.dataset or "cifar"
        gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
        if args.preset:
            preset, reason = args.preset, "asked for"
        elif dataset == "cifar":
            preset, reason = ("cifar", "a CUDA GPU is here") if gpu else ("cifar-cpu", "no CUDA GPU: sized for an hour on a CPU")
        else:
            preset, reason = "tiny", f"the default for --dataset {dataset}"
        cfg = PRESETS[preset](dataset=dataset)
        name = args.name or time.strftime(f"{dataset}-{preset}-%Y%m%d-%H%M%S")
        cfg.run_dir = str(Path(args.runs_dir) / name)
        if (Path(cfg.run_dir) / "config.json").exists():
            usage("--name", name, f"{cfg.run_dir} holds a run already: continue it with --resume {cfg.run_dir}, "
                                  "or choose another --name")
        if cfg.device == "cpu" and args.device is None and torch.cuda.is_available():
            cfg.device = "cuda"
    for flag, fieldname in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, fieldname, value)
    if args.stage is not None:
        cfg.stage = args.stage
    if args.vae is not None:
        cfg.vae_path = args.vae
    if args.max_steps is not None:
        cfg.vae_steps = cfg.ldm_steps = args.max_steps
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.ldm_steps is not None:
        cfg.ldm_steps = args.ldm_steps
    if args.unet_channels is not None:
        cfg.unet = dict(cfg.unet, model_channels=args.unet_channels)
    if args.no_cache_latents:
        cfg.cache_latents = False
    if args.amp:
        cfg.amp = True
    if args.compile:
        cfg.compile = True
    if cfg.min_snr_gamma == 0:
        cfg.min_snr_gamma = None
    check_config(cfg)
    if not args.resume:
        plan = describe_plan(cfg, preset, reason)
    return cfg, plan


# The flags a resumed run cannot change: they decide the models' shapes or the data the run was started on.
FIXED_ON_RESUME = ("dataset", "data_dir", "preset", "resolution", "unet_channels", "num_images",
                   "holdout_per_class", "seed")


def check_flags(args) -> None:
    """Every flag's value, before any data is read or model built: one line and exit status 2 if not."""
    if args.resume:
        given = [f for f in FIXED_ON_RESUME if getattr(args, f) is not None] + (["name"] if args.name else [])
        if given:
            flag = "--" + given[0].replace("_", "-")
            usage(flag, getattr(args, given[0]), "cannot change a run being resumed (it keeps its config.json); "
                                                  "start a new run instead")
    for flag in ("max_steps", "vae_steps", "ldm_steps", "num_images", "batch_size", "vae_batch_size",
                 "grad_accum", "log_every", "sample_steps", "resolution", "unet_channels"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    for flag in ("holdout_per_class", "warmup_steps", "save_every", "sample_every", "disc_start",
                 "probe_per_class", "evaluate"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 0)
    check_int("--sample-steps", args.sample_steps, 1, 1000)
    check_float("--max-minutes", args.max_minutes, 0, 7 * 24 * 60, low_open=True)
    check_float("--vae-share", args.vae_share, 0, 1, low_open=True, high_open=True)
    check_float("--lr", args.lr, 0, 1, low_open=True)
    check_float("--vae-lr", args.vae_lr, 0, 1, low_open=True)
    check_float("--grad-clip", args.grad_clip, 0)
    check_float("--ema-decay", args.ema_decay, 0, 1, high_open=True)
    check_float("--caption-dropout", args.caption_dropout, 0, 1, high_open=True)
    check_float("--guidance", args.guidance, 0, 100)
    check_float("--min-snr-gamma", args.min_snr_gamma, 0)
    check_seed("--seed", args.seed)
    check_choice("--dtype", args.dtype, ("float32", "bfloat16", "float16"))
    if args.device is not None:
        resolve_cli_device(args.device)
    if args.dataset == "folder" and not args.data_dir:
        fail("--dataset folder needs --data-dir DIR (a folder of images)", USAGE)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    check_readable_file("--vae", args.vae)
    if args.vae is not None and args.stage != "ldm" and not args.resume:
        fail(f"--vae {args.vae} is for --stage ldm (a trained VAE to start stage 2 from)", USAGE)
    if args.name is not None and (not args.name.strip() or os.sep in args.name or args.name in (".", "..")):
        usage("--name", args.name, "must be a plain folder name (no slashes)")
    if not args.resume:
        check_writable_dir("--runs-dir", args.runs_dir)


def check_config(cfg: TrainConfig) -> None:
    """What only the whole config can tell: sizes that fit the models, budgets, batches that split."""
    try:
        unet, vae = UNetConfig.from_dict(cfg.unet), VAEConfig.from_dict(cfg.vae)
    except (ValueError, TypeError) as e:
        fail(f"--unet-channels {cfg.unet.get('model_channels')}: {e}", USAGE)
    multiple = vae.downsample_factor * unet.downsample_factor
    if cfg.resolution % multiple or not multiple <= cfg.resolution <= 1024:
        usage("--resolution", cfg.resolution, f"must be a multiple of {multiple} (the VAE's factor "
                                              f"{vae.downsample_factor} x the UNet's {unet.downsample_factor}), "
                                              "at most 1024")
    if cfg.batch_size % cfg.grad_accum:
        usage("--batch-size", cfg.batch_size, f"must divide by --grad-accum {cfg.grad_accum}")
    if cfg.vae_steps is None and cfg.ldm_steps is None and cfg.max_minutes is None:
        fail("no budget: give --max-steps or --max-minutes", USAGE)
    if cfg.stage == "ldm" and cfg.vae_path is None and not (Path(cfg.run_dir) / "vae.safetensors").exists():
        fail("--stage ldm needs a trained VAE: --vae PATH (or a run folder that has vae.safetensors)", USAGE)


def resolve_cli_device(name: str) -> None:
    """A --device value torch understands, and a GPU where CUDA is asked for."""
    try:
        device = torch.device(name)
    except RuntimeError:
        usage("--device", name, "must be cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        usage("--device", name, "must be cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu", USAGE)


def finished(cfg: TrainConfig) -> Optional[str]:
    """When the run in cfg.run_dir has done all the training cfg asks for: what it did; else None."""
    stage = "vae" if cfg.stage == "vae" else "ldm"
    run = Run(cfg.run_dir, main=False)
    state = run.load_state(stage)
    if state is None or not state.get("done"):
        return None
    vae_state = run.load_state("vae") if stage == "ldm" and cfg.stage == "all" else None
    minutes = stage_minutes(cfg, stage, float(vae_state["elapsed"]) if vae_state else 0.0)
    budget = Budget(cfg.vae_steps if stage == "vae" else cfg.ldm_steps, minutes, float(state["elapsed"]))
    if not budget.reached(int(state["step"])):
        return None
    return (f"{cfg.run_dir} is finished: {'stage 1 (VAE)' if stage == 'vae' else 'stage 2'} ended at step "
            f"{int(state['step'])} after {float(state['elapsed']) / 60:.1f} minutes. Nothing was changed; to train "
            f"longer, resume with more steps (--{'vae' if stage == 'vae' else 'ldm'}-steps) or minutes (--max-minutes)")


def run(cfg: TrainConfig, stage: str = "all", resume: bool = False, vae_path: Optional[str] = None,
        callback=None):
    """Train the requested stage(s); returns the LatentDiffusion (stage 2) or (vae, scale) (stage 1),
    or None when `callback` stopped the run early."""
    started = time.perf_counter()  # loading the data is part of the budget
    cfg = replace(cfg, stage=stage)
    data = load_dataset(cfg)
    if stage == "vae":
        return train_vae(cfg, resume=resume, data=data, callback=callback, started=started)
    if stage == "ldm":
        return train_ldm(cfg, resume=resume, data=data, vae_path=vae_path, callback=callback, started=started)
    vae, scale = train_vae(cfg, resume=resume, data=data, callback=callback, started=started)
    if scale is None:
        return None
    return train_ldm(cfg, vae=vae, scale_factor=scale, resume=resume, data=data, callback=callback)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    cfg, plan = config_from_args(args)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.resume:
        check_writable_dir("--resume", cfg.run_dir)
        done = finished(cfg)
        if done:
            if rank0:
                print(done)
            return 0
    if rank0:
        print(plan, flush=True)
    STOP.install()
    try:
        result = run(cfg, cfg.stage, resume=bool(args.resume), vae_path=cfg.vae_path)
        if isinstance(result, LatentDiffusion) and cfg.evaluate_per_class and rank0:
            from .evaluate import evaluate_run
            evaluate_run(cfg.run_dir, runs_dir=str(Path(cfg.run_dir).parent), data_dir=cfg.data_dir,
                         n=cfg.evaluate_per_class, model=result)
        if STOP.requested:
            fail(f"stopped by {STOP.signal}; saved {STOP.saved or 'nothing new'}. Continue with --resume "
                 f"{cfg.run_dir}", 130 if STOP.signal == "SIGINT" else 143)
    except (data_module.DataError, CheckpointError) as e:
        fail(str(e))
    except TrainingDiverged as e:
        fail(str(e))
    except KeyboardInterrupt:
        saved = [p.name for p in (Path(cfg.run_dir) / "state_vae.pt", Path(cfg.run_dir) / "state_ldm.pt") if p.exists()]
        fail("interrupted " + (f"between steps; the last saved state ({', '.join(saved)}) is kept: continue with "
                               f"--resume {cfg.run_dir}" if saved else "before the first training step; nothing "
                               "was saved, so start the run again"), 130)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()


if __name__ == "__main__":
    main()
