"""Stage 2: train the UNet and the text encoder, from scratch, on the frozen VAE's latents."""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import data as data_module
from ..clip_text import CLIPTextConfig, CLIPTextModel
from ..data.wording import Wording
from ..convert import save_checkpoint, strip_prefix
from ..ldm import LatentDiffusion, to_diffusion_latents
from ..plumbing import (STOP, Budget, autocast, check_finite, lr_factor, mean_over_processes, progress_bar, rng_state,
                        set_rng_state, training_steps)
from ..schedule import NoiseSchedule
from ..steps import EMA, Denoiser, adamw, decay_groups, diffusion_loss, training_inputs
from ..tokenizer import CLIPTokenizer
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL
from .config import TrainConfig, begin_stage, dtype_of, stage_minutes
from .stage1 import load_vae, measure_scale_factor


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, images: torch.Tensor, device, batch_size: int = 256) -> tuple:
    """(mean, std) of q(z|x) for every uint8 image (N, 3, H, W), on the CPU, so each step only samples
    z = mean + std * eps."""
    vae.eval()
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(data_module.to_float(images[i:i + batch_size]).to(device, dtype))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def build_pipeline(unet, vae, text_encoder, tokenizer, schedule, scale_factor):
    """The composed model that samples (ldm.LatentDiffusion)."""
    return LatentDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           schedule=schedule, scale_factor=scale_factor)


@torch.no_grad()
def sample_grid(pipeline, prompts: list, path, num_steps: int, guidance_scale: float, seed: int = 0,
                resolution: Optional[int] = None, guidance_interval=None) -> torch.Tensor:
    """One image per prompt from fixed noise (`seed`), saved as a grid; returns images (B, 3, H, W) in [0, 1]."""
    import torchvision
    x = pipeline.generate(list(prompts), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                          guidance_interval=guidance_interval, sampler="ddim", height=resolution, width=resolution)
    if path is not None:
        torchvision.utils.save_image(x.float().cpu(), path, nrow=min(len(prompts), 5), padding=1)
    return x


def fit_class_probe(vae: AutoencoderKL, train_latents: torch.Tensor, train, held, scale_factor: float,
                    device) -> tuple:
    """(LatentProbe on the training latents, its accuracy on the held-out images' latents)."""
    from ..judge import LatentProbe

    probe = LatentProbe(to_diffusion_latents(train_latents, scale_factor), train.labels, len(train.class_names))
    held_latents = to_diffusion_latents(cache_latents(vae, held.images, device)[0], scale_factor)
    return probe, probe.accuracy(held_latents, held.labels)


@torch.no_grad()
def probe_samples(pipeline, probe, class_names, per_class: int, cfg: TrainConfig) -> float:
    """How often the latents sampled for "a photo of a <class>" are read as that class by the probe."""

    z = pipeline.generate([data_module.class_prompt(c) for c in class_names], num_images=per_class, seed=cfg.seed,
                          num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                          guidance_interval=cfg.guidance_interval, output_type="latent")
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
    started, dist, device, run, train, held = begin_stage(cfg, data, started)
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
    run.write_config(cfg.to_dict())

    wdtype = dtype_of(cfg.dtype)
    torch.manual_seed(cfg.seed)
    unet_cfg, text_cfg = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    if unet_cfg.context_dim != text_cfg.width:
        raise SystemExit(f"error: the UNet reads a {unet_cfg.context_dim}-wide context but the text "
                         f"encoder is {text_cfg.width} wide")
    unet = UNet(unet_cfg).to(device, wdtype)
    text_encoder = CLIPTextModel(text_cfg).to(device, wdtype)
    tokenizer = CLIPTokenizer.default(context_length=text_cfg.context_length)
    if cfg.reword and train.templated and train.class_names:
        # Class captions in words the templates never use, so the encoder learns which word is the class.
        train.wording = Wording(tokenizer, train.class_names, p=cfg.reword)
    schedule = NoiseSchedule.from_dict(cfg.schedule)
    denoiser = Denoiser(unet, text_encoder)
    opt = adamw(decay_groups(denoiser, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
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

    latents = cache_latents(vae, train.images, device) if cfg.cache_latents else None
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
                    cfg.sample_steps, cfg.guidance_scale, seed=cfg.seed, resolution=train.resolution,
                    guidance_interval=cfg.guidance_interval)
        if probe is not None:
            accuracy = probe_samples(pipeline, probe, train.class_names, cfg.probe_per_class, cfg)
            run.log({"stage": "ldm", "step": step, "event": "probe", "probe_samples": accuracy,
                     "probe_real": probe_real, "elapsed_s": budget.elapsed})
            bar.write(f"step {step}: the class probe reads the prompted class in {accuracy:.0%} of samples "
                      f"({probe_real:.0%} of real held-out images, {1 / len(train.class_names):.0%} by chance)")

    budget = Budget(cfg.ldm_steps, minutes, elapsed, started)
    bar = progress_bar(cfg.ldm_steps, "stage 2 (UNet + text)", dist.main, initial=step)
    denoiser.train()
    t_log, n_images = time.perf_counter(), 0
    for step, g, idx in training_steps(budget, dist, step, seed=cfg.seed, stage="ldm", n=len(train),
                                       batch_size=cfg.batch_size):
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
        captions, t, noise = training_inputs(z, captions, schedule, cfg.caption_dropout, g)
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, budget.progress(step), cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            start = (k * dist.world + dist.rank) * micro
            rows = slice(start, start + micro)
            tokens = tokenizer(captions[rows]).to(device)
            sync = k == cfg.grad_accum - 1 or dist.world == 1
            with (model.no_sync() if not sync else nullcontext()), autocast(cfg.amp, device):
                loss = diffusion_loss(model, schedule, z[rows].to(device, wdtype), tokens,
                                      t[rows].to(device), noise[rows].to(device, wdtype), cfg.min_snr_gamma)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        mean_loss = mean_over_processes(loss_sum, dist)
        check_finite(mean_loss, "diffusion", step, run, last_saved)
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(denoiser)
        step += 1                  # steps done; training_steps yields the next one
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
