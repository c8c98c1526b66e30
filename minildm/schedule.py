"""The noise schedule and the forward (noising) process of a discrete-time diffusion model.

A diffusion model is trained to undo a fixed corruption: at timestep t the clean latent z_0 is
replaced by z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I). Everything about that
corruption is fixed by one sequence of numbers, the betas; this module turns betas into every quantity
the training loss and the samplers need.

Notation (code name -> paper symbol; DDPM = Ho et al. 2020, k-diffusion = Karras et al. 2022):

    betas            beta_t         per-step noise variance, t = 0 .. T-1
    alphas           alpha_t        1 - beta_t
    alphas_cumprod   abar_t         prod_{s <= t} alpha_s; the signal fraction left at step t
    x0 / z_0         x_0            the clean sample (pixels x or latents z; this module does not care)
    z_t              x_t            the noisy sample at step t
    eps              epsilon        the Gaussian noise mixed in
    v                v              the "velocity" sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
    snr              SNR(t)         abar_t / (1 - abar_t)
    sigmas           sigma(t)       sqrt((1 - abar_t) / abar_t) = SNR(t)^(-1/2): the noise level of the
                                    variance-exploding view x = z_t / sqrt(abar_t) = x0 + sigma eps

Shapes: t is an int, or a tensor of shape (B,) (one timestep per sample); x0, z_t, eps, v are
(B, ...) with any trailing dimensions, e.g. (B, C, h, w) latents or (B, 2) toy points.

Timesteps count from 0 (least noisy) to num_timesteps - 1 (most noisy), as in the original code.
"""
from __future__ import annotations

import math

import torch

# Nichol & Dhariwal (2021) cap betas below 1 so that the cosine schedule's last steps stay finite,
# and offset the cosine by s so that beta_0 is not vanishingly small.
COSINE_MAX_BETA = 0.999
COSINE_OFFSET = 0.008


class NoiseSchedule:
    """A discrete noise schedule: betas and everything derived from them.

    The cumulative product is taken in float64 (as the original Stable Diffusion code does) and the
    public tensors are float32. Build one with a classmethod: `linear`, `scaled_linear`, `cosine`,
    `sd`, or `from_dict`.
    """

    def __init__(self, betas: torch.Tensor, kind: str = "custom", params: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D sequence of numbers in (0, 1)")
        self.kind = kind  # the recipe name, kept so that to_dict() stays short
        self.params = dict(params or {})
        self.num_timesteps = len(betas)

        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # DDPM eq. 7: the variance of q(z_{t-1} | z_t, z_0); the "fixed small" choice for sampling.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The sigma table comes from the float32 table of abar, in float32, as k-diffusion and diffusers
        # compute it: at small t, 1 - abar loses digits in float32 (sigma_0 comes out 1.3e-5 above its
        # float64 value), and the Karras grid, which starts from sigma_0, inherits that.
        abar32 = alphas_cumprod.float()
        sigmas = ((1.0 - abar32) / abar32).sqrt()

        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.alphas_cumprod_prev = alphas_cumprod_prev.float()
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt().float()
        self.posterior_variance = posterior_variance.float()
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    # ------------------------------------------------------------------ construction

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        params = dict(num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end)
        return cls(betas, "linear", params)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """Latent diffusion's schedule: sqrt(beta) evenly spaced, so betas grow quadratically."""
        root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
        params = dict(num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end)
        return cls(root**2, "scaled_linear", params)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, offset: float = COSINE_OFFSET, max_beta: float = COSINE_MAX_BETA):
        """Improved DDPM's schedule: abar follows a squared cosine, so the SNR falls smoothly."""
        def abar(u):  # u in [0, 1] is the fraction of the diffusion elapsed
            return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
                 for i in range(num_timesteps)]
        params = dict(num_timesteps=num_timesteps, offset=offset, max_beta=max_beta)
        return cls(torch.tensor(betas, dtype=torch.float64), "cosine", params)

    @classmethod
    def sd(cls):
        """Stable Diffusion v1's schedule: scaled_linear, 0.00085 -> 0.012 over 1000 steps."""
        return cls.scaled_linear(1000, 0.00085, 0.012)

    def to_dict(self) -> dict:
        """A JSON-serialisable description; custom schedules store their betas."""
        if self.kind == "custom":
            return {"kind": "custom", "betas": self.betas.double().tolist()}
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild a schedule written by to_dict()."""
        d = dict(d)
        kind = d.pop("kind")
        if kind == "custom":
            return cls(torch.tensor(d["betas"], dtype=torch.float64))
        builders = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine}
        if kind not in builders:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(builders)} or 'custom'")
        return builders[kind](**d)

    def __repr__(self):
        return f"NoiseSchedule({self.kind}, num_timesteps={self.num_timesteps}, params={self.params})"

    # ------------------------------------------------------------------ the forward process

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Draw z_t ~ q(z_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) using the given noise (DDPM eq. 4)."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    # ------------------------------------------------------------------ conversions between predictions
    # z_t = a x0 + s eps with a = sqrt(abar_t), s = sqrt(1 - abar_t), a^2 + s^2 = 1; v = a eps - s x0.

    def x0_from_eps(self, z_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a noise prediction."""
        a, s = self._coefficients(t, z_t)
        return (z_t - s * eps) / a

    def eps_from_x0(self, z_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """The noise implied by a clean-sample prediction."""
        a, s = self._coefficients(t, z_t)
        return (z_t - a * x0) / s

    def v_from_x0_eps(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target for a clean sample and its noise."""
        a, s = self._coefficients(t, x0)
        return a * eps - s * x0

    def x0_from_v(self, z_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a v prediction."""
        a, s = self._coefficients(t, z_t)
        return a * z_t - s * v

    def eps_from_v(self, z_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """The noise implied by a v prediction."""
        a, s = self._coefficients(t, z_t)
        return s * z_t + a * v

    # ------------------------------------------------------------------ the continuous (sigma) view

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at integer or fractional timesteps."""
        return self.t_to_sigma(t) ** -2

    def t_to_sigma(self, t) -> torch.Tensor:
        """sigma at (possibly fractional) timesteps, interpolating log(sigma) linearly between steps."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """The fractional timestep whose sigma is `sigma` (inverse of t_to_sigma, clamped to [0, T-1]).

        Interpolates linearly in log sigma, computing in float64; the result is float64 for a float64
        `sigma`, else float32.
        """
        sigma = torch.as_tensor(sigma)
        out_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        log_sigma = sigma.double().clamp(min=1e-10).log()
        table = self.log_sigmas.double()
        # index of the last table entry at or below log_sigma (log_sigmas increases with t)
        low = (log_sigma.unsqueeze(-1) >= table).sum(-1).sub(1).clamp(0, self.num_timesteps - 2)
        lo, hi = table[low], table[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (low + w).to(out_dtype)

    # ------------------------------------------------------------------ helpers

    def _coefficients(self, t, like: torch.Tensor):
        """sqrt(abar_t) and sqrt(1 - abar_t) shaped to broadcast against `like` (B, ...)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device, dtype=torch.long)
        a = self.sqrt_alphas_cumprod[t].to(like.device, like.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].to(like.device, like.dtype)
        if a.ndim == 1:
            shape = (-1,) + (1,) * (like.ndim - 1)
            a, s = a.reshape(shape), s.reshape(shape)
        return a, s
