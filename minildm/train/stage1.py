"""Stage 1: train the VAE on the images, then measure the latent scale factor (lesson 05, lesson 06)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import data as data_module
from ..convert import load_checkpoint, load_module, save_checkpoint
from ..plumbing import (STOP, Budget, all_reduce_grads, autocast, check_finite, lr_factor, mean_over_processes,
                        progress_bar, rng_state, set_rng_state, step_generator, training_steps)
from ..steps import psnr, vae_objective
from ..vae import AutoencoderKL, VAEConfig, estimate_scale_factor
from ..vae_loss import PatchDiscriminator, VAELoss
from .config import TrainConfig, begin_stage, stage_minutes


def load_vae(path, device="cpu") -> tuple:
    """(AutoencoderKL, scale_factor or None) from a minildm checkpoint with a VAE in it."""
    ckpt = load_checkpoint(path)
    if ckpt.vae is None or not ckpt.meta or not ckpt.meta.get("vae"):
        raise SystemExit(f"error: {path} has no minildm VAE (train one with --stage vae)")
    vae = AutoencoderKL(VAEConfig.from_dict(ckpt.meta["vae"]))
    load_module("vae", vae, ckpt.vae, dtype=torch.float32, device=device)
    return vae, ckpt.meta.get("scale_factor")


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The VAE's activation layout. Channels-last suits oneDNN's and cuDNN's float32 convolutions (13% faster
    here on the CPU); under bfloat16 autocast on a CPU the plain layout is the faster one (0.096 against
    0.112 s per step of 16, bench/precision_speed.py)."""
    return torch.contiguous_format if cfg.amp and device.type == "cpu" else torch.channels_last


def train_vae(cfg: TrainConfig, resume: bool = False, data=None, callback=None,
              started: Optional[float] = None) -> tuple:
    """Stage 1: train the VAE on the images; returns (vae, scale_factor) and writes vae.safetensors.

    `callback(stage, step, logs)` runs after every step; when it returns True the stage stops there
    (its state is saved, so `resume=True` continues it), and (vae, None) is returned. `started`: the
    perf_counter() time the run began, so that loading the data counts against the budget.
    """
    started, dist, device, run, train, held = begin_stage(cfg, data, started)
    vae_cfg = VAEConfig.from_dict(cfg.vae)
    if train.resolution % vae_cfg.downsample_factor:
        raise SystemExit(f"error: resolution {train.resolution} does not divide by the VAE's factor "
                         f"{vae_cfg.downsample_factor}")

    torch.manual_seed(cfg.seed)
    layout = memory_format(cfg, device)
    vae = AutoencoderKL(vae_cfg).to(device, memory_format=layout)
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
    bar = progress_bar(cfg.vae_steps, "stage 1 (VAE)", dist.main, initial=step)
    vae.train()
    t_log, n_images = time.perf_counter(), 0
    for step, g, idx in training_steps(budget, dist, step, seed=cfg.seed, stage="vae", n=len(train),
                                       batch_size=cfg.vae_batch_size):
        x, _ = train.batch(idx, g)
        x = x[dist.rank * local:(dist.rank + 1) * local].to(device, memory_format=layout)
        g_rank = step_generator(cfg.seed, step, "vae", rank=1 + dist.rank)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = cfg.vae_lr * lr_factor(step, 0, budget.progress(step), cfg.min_lr_ratio)

        with autocast(cfg.amp, device):
            loss, logs, x_rec = vae_objective(model, loss_fn, x, step, g_rank, last_layer=vae.decoder.conv_out.weight)
        check_finite(mean_over_processes(loss.detach(), dist), "VAE", step, run, last_saved)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None and loss_fn.discriminator_active(step):
            loss_d, logs_d = loss_fn.discriminator_loss(x, x_rec.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            all_reduce_grads(disc, dist)
            opt_d.step()
            logs.update(logs_d)
        step += 1                  # steps done; training_steps yields the next one
        n_images += cfg.vae_batch_size
        bar.update(1)

        if step % cfg.log_every == 0 or step == 1:
            mean_loss = mean_over_processes(torch.tensor(logs["loss"]), dist).item()
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
        run.log({"stage": "vae", "step": step, "loss": mean_over_processes(torch.tensor(logs["loss"]), dist).item(),
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
