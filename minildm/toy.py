"""A diffusion model you can watch: 2-D points, a small MLP, seconds of CPU training.

Everything here is the real machinery at a tiny size: the model predicts the noise eps in
z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (schedule.q_sample), it is trained with the same
"simple" loss as Stable Diffusion's UNet, and it is sampled with the same functions from samplers.py.
Because a sample is just a point in the plane, every step of noising and denoising can be plotted.

Notation: x0 data points, z_t noisy points, t timesteps (float32, may be fractional), eps noise,
eps_pred the model's output, abar = alphas_cumprod. Shapes: points (N, 2); t (N,).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .samplers import SAMPLERS, init_noise_scale
from .schedule import NoiseSchedule

# ---------------------------------------------------------------------------- data sets


def make_moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half circles, centred on the origin. Returns (n, 2)."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1)
    return points + noise * torch.randn(n, 2, generator=generator)


def make_spiral(n: int, noise: float = 0.03, turns: float = 1.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A spiral whose radius grows from 0.1 to 1.5 over `turns` turns. Returns (n, 2)."""
    u = torch.rand(n, generator=generator)
    angle = 2 * math.pi * turns * u
    radius = 0.1 + 1.4 * u
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return points + noise * torch.randn(n, 2, generator=generator)


DATASETS = {"moons": make_moons, "spiral": make_spiral}


def make_data(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points of the named 2-D data set ("moons" or "spiral")."""
    if name not in DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](n, generator=generator)


# ---------------------------------------------------------------------------- the model


@dataclass
class ToyConfig:
    hidden: int = 64       # width of the MLP
    num_layers: int = 4    # residual hidden layers
    time_dim: int = 32     # size of the sinusoidal timestep embedding
    max_period: float = 10000.0  # longest wavelength of the embedding, as in the UNet

    @classmethod
    def tiny(cls):  # 2,786 parameters
        return cls(hidden=32, num_layers=2, time_dim=16)

    @classmethod
    def small(cls):  # 19,010 parameters
        return cls()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ToyDenoiser(nn.Module):
    """An MLP eps-predictor for 2-D points: forward(z_t (N, 2), t (N,)) -> eps_pred (N, 2).

    Its signature is the samplers' eps_fn, so a trained model is passed to them as it is.
    """

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(2 + cfg.time_dim, cfg.hidden)
        self.layers = nn.ModuleList(nn.Linear(cfg.hidden, cfg.hidden) for _ in range(cfg.num_layers))
        self.out = nn.Linear(cfg.hidden, 2)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])
        emb = timestep_embedding(t, self.cfg.time_dim, self.cfg.max_period)
        h = F.silu(self.inp(torch.cat([z_t, emb], dim=1)))
        for layer in self.layers:
            h = h + F.silu(layer(h))
        return self.out(h)


# ---------------------------------------------------------------------------- training


def simple_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, generator=None) -> torch.Tensor:
    """DDPM's simple loss: noise x0 at a random timestep and regress the noise (DDPM eq. 14)."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    z_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(model(z_t, t.float()), noise)


def train_toy(data: str = "moons", num_steps: int = 1500, batch_size: int = 512, lr: float = 2e-2,
              cfg: ToyConfig | None = None, schedule: NoiseSchedule | None = None, seed: int = 0,
              num_points: int = 20000, log_every: int = 0):
    """Train a ToyDenoiser on a 2-D data set; a few seconds on one CPU thread.

    Returns (model in eval mode, schedule, losses: list of per-step losses). The schedule defaults to
    Stable Diffusion's. Deterministic for a given seed, and leaves the global random state alone.
    """
    cfg = cfg or ToyConfig.small()
    schedule = schedule or NoiseSchedule.sd()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyDenoiser(cfg)
    points = make_data(data, num_points, generator)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay to zero: the last steps average out the noise of the loss
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / num_steps)))
    losses, start = [], time.time()
    model.train()
    for step in range(num_steps):
        idx = torch.randint(0, num_points, (batch_size,), generator=generator)
        loss = simple_loss(model, points[idx], schedule, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1:5d}  loss {recent:.4f}  ({time.time() - start:.1f}s)")
    return model.eval(), schedule, losses


# ---------------------------------------------------------------------------- sampling and measuring


def sample_toy(model, schedule: NoiseSchedule, sampler: str = "ddim", num_steps: int = 50, n: int = 2000,
               generator: torch.Generator | None = None, return_trajectory: bool = False, **options):
    """Draw n points with a named sampler; optionally also the path (num_steps + 1, n, 2) of z_t."""
    z = torch.randn(n, 2, generator=generator) * init_noise_scale(sampler, schedule, num_steps, **options)
    path = []

    def keep(info):
        path.append(info["z_t"])

    out = SAMPLERS[sampler](model, z, schedule, num_steps, generator=generator,
                            callback=keep if return_trajectory else None, **options)
    if return_trajectory:
        return out, torch.stack(path + [out])
    return out


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Average 1-D Wasserstein-1 distance between two point clouds over random directions.

    a, b: (N, D) with the same N. Zero for identical clouds; grows with any mismatch in position,
    spread or shape.
    """
    if a.shape != b.shape:
        raise ValueError(f"point clouds must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], num_projections, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa = (a.float() @ directions).sort(dim=0).values
    pb = (b.float() @ directions).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def nearest_distance(points: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean distance from each point to its nearest neighbour in `reference` (a dense data sample).

    Small when every sample lies on the data; blind to coverage (one moon alone scores well), so use
    it next to sliced_wasserstein.
    """
    return torch.cdist(points.float(), reference.float()).min(dim=1).values.mean().item()


# ---------------------------------------------------------------------------- plots


def plot_points(ax, points: torch.Tensor, title: str | None = None, lim: float = 3.0, **scatter_kwargs):
    """Scatter (N, 2) points on a matplotlib axis with a fixed square view."""
    style = dict(s=2, alpha=0.5)
    style.update(scatter_kwargs)
    ax.scatter(points[:, 0].cpu(), points[:, 1].cpu(), **style)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_noising(x0: torch.Tensor, schedule: NoiseSchedule, timesteps=(0, 100, 250, 500, 750, 999),
                 generator: torch.Generator | None = None):
    """One scatter plot per timestep of the same points pushed through q_sample. Returns the figure."""
    import matplotlib.pyplot as plt

    noise = torch.randn(x0.shape, generator=generator)
    fig, axes = plt.subplots(1, len(timesteps), figsize=(2.2 * len(timesteps), 2.4))
    for ax, t in zip(axes, timesteps):
        abar = schedule.alphas_cumprod[t].item()
        plot_points(ax, schedule.q_sample(x0, t, noise), f"t={t}  abar={abar:.3f}")
    fig.tight_layout()
    return fig


def plot_trajectories(ax, path: torch.Tensor, num_paths: int = 12, title: str | None = None, lim: float = 3.0):
    """Draw the paths (S, N, 2) of the first num_paths points over their final positions."""
    final = path[-1]
    plot_points(ax, final, title, lim=lim, color="tab:blue")
    for i in range(min(num_paths, path.shape[1])):
        ax.plot(path[:, i, 0].cpu(), path[:, i, 1].cpu(), color="tab:orange", lw=0.7, alpha=0.8)
        ax.scatter(path[0, i, 0].cpu(), path[0, i, 1].cpu(), color="black", s=4)
    return ax
