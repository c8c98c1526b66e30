"""The checks of chapters 06-09 (training, checkpoints, views, break it), each against the package's own function."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .compare import Chapter, CheckFailed, inputs, compare, compare_number, _gen, _randn
from .chapters_01_05 import _FakeConditionalModel


# ----------------------------------------------------------------------------------------------
# 06 training: the loss and the EMA of the weights
# ----------------------------------------------------------------------------------------------

def check_training_loss(impl) -> None:
    """training_loss(model, schedule, z0, context, t, noise) equals steps.diffusion_loss."""
    from ..schedule import NoiseSchedule
    from ..steps import diffusion_loss

    model = _FakeConditionalModel()
    schedule = NoiseSchedule.sd()
    z0, noise = _randn(3, 4, 4, 4, seed=21), _randn(3, 4, 4, 4, seed=22)
    context, t = _randn(3, 5, 8, seed=23), torch.tensor([3, 400, 990])
    expected = diffusion_loss(model, schedule, z0, context, t, noise)
    got = impl.training_loss(model, schedule, z0, context, t, noise)
    compare(f"training_loss(model, schedule=sd(), {inputs(z0=z0, context=context, t=t, noise=noise)})",
            torch.as_tensor(got), expected, atol=1e-6)


def check_ema_update(impl) -> None:
    """ema_update(shadow, weights, decay, num_updates) follows steps.EMA, warm-up included."""
    from ..steps import EMA

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=_gen(step)))
        ema.update(model)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        got = impl.ema_update(shadow, weights, 0.99, step)
        if not isinstance(got, dict) or set(got) != set(shadow):
            raise CheckFailed(f"ema_update should return a dict with the keys {sorted(shadow)}")
        for k in shadow:
            compare(f"ema_update(..., decay=0.99, num_updates={step})[{k!r}] after {step} updates",
                    got[k], ema.shadow[k], atol=1e-6)
        shadow = got


def reference_06():
    from ..steps import diffusion_loss, ema_update

    return SimpleNamespace(training_loss=diffusion_loss, ema_update=ema_update)


CHAPTER_06 = Chapter("06", "06_training", "the training step",
                     {"training_loss": check_training_loss, "ema_update": check_ema_update}, reference_06)


# ----------------------------------------------------------------------------------------------
# 07 Stable Diffusion: the checkpoint's EMA key names and picking the UNet's weights
# ----------------------------------------------------------------------------------------------

def _unet_keys():
    from ..unet import UNet, UNetConfig

    return list(UNet(UNetConfig.tiny()).state_dict())


def check_ema_key(impl) -> None:
    """ema_key(unet_key) equals convert.ema_key for every key of a tiny UNet."""
    from .. import convert

    for key in _unet_keys():
        expected = convert.ema_key(key)
        got = impl.ema_key(key)
        if got != expected:
            raise CheckFailed(f"ema_key({key!r}): expected {expected!r}, got {got!r}")


def check_unet_weights(impl) -> None:
    """unet_weights(state, use_ema) picks the same tensors as convert.split_original."""
    from .. import convert

    keys = _unet_keys()
    unet = {k: torch.full((1,), float(i)) for i, k in enumerate(keys)}
    ema = {k: torch.full((1,), -float(i)) for i, k in enumerate(keys)}
    vae = {"encoder.conv_in.weight": torch.zeros(1)}
    for with_ema in (True, False):
        state = convert.merge_original(unet=unet, vae=vae, ema_unet=ema if with_ema else None)
        state["alphas_cumprod"] = torch.ones(3)  # training buffers real files carry
        if with_ema:
            state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
        ckpt = convert.split_original(dict(state))
        for use_ema in (True, False):
            expected = ckpt.ema_unet if (use_ema and ckpt.ema_unet is not None) else ckpt.unet
            got = impl.unet_weights(dict(state), use_ema)
            label = f"unet_weights(a checkpoint {'with' if with_ema else 'without'} model_ema.*, use_ema={use_ema})"
            if not isinstance(got, dict):
                raise CheckFailed(f"{label}: expected a dict, got {type(got).__name__}")
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            if missing or extra:
                raise CheckFailed(f"{label}: keys differ: {len(missing)} missing (e.g. {missing[:2]}), "
                                  f"{len(extra)} unexpected (e.g. {extra[:2]})")
            for k in expected:
                if not torch.equal(got[k], expected[k]):
                    which = "EMA" if torch.equal(got[k], ema.get(k, torch.zeros(1))) else "non-EMA"
                    raise CheckFailed(f"{label}: {k!r} holds the {which} weight; expected "
                                      f"{'EMA' if expected is ckpt.ema_unet else 'non-EMA'}")


def reference_07():
    from .. import convert

    def unet_weights(state, use_ema):
        ckpt = convert.split_original(state)
        return ckpt.ema_unet if (use_ema and ckpt.ema_unet is not None) else ckpt.unet

    return SimpleNamespace(ema_key=convert.ema_key, unet_weights=unet_weights)


CHAPTER_07 = Chapter("07", "07_stable_diffusion", "checkpoint keys",
                     {"ema_key": check_ema_key, "unet_weights": check_unet_weights}, reference_07)


# ----------------------------------------------------------------------------------------------
# 08 views: spherical interpolation
# ----------------------------------------------------------------------------------------------

def check_slerp(impl) -> None:
    """slerp(a, b, t) equals views.slerp on whole noises; ends at a and b; keeps the norm of equal-norm inputs."""
    from ..views.core import slerp

    a, b = _randn(1, 4, 8, 8, seed=19), _randn(1, 4, 8, 8, seed=20)
    b = b * (a.norm() / b.norm())
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        got = impl.slerp(a, b, t)
        compare(f"slerp({inputs(a=a, b=b)}, t={t})", got, slerp(a, b, t), atol=1e-4)
    mid = impl.slerp(a, b, 0.5)
    if abs(mid.norm().item() - a.norm().item()) > 1e-3 * a.norm().item():
        raise CheckFailed(f"slerp(a, b, 0.5) has norm {mid.norm().item():.4f}; for |a| = |b| = "
                          f"{a.norm().item():.4f} it should keep that norm (lerp would shrink it)")
    # Nearly parallel vectors must not divide by zero.
    got = impl.slerp(a, a * 1.0000001, 0.5)
    compare("slerp(a, a, 0.5): parallel inputs should give a back", got, a, atol=1e-4)


def reference_08():
    from ..views.core import slerp

    return SimpleNamespace(slerp=lambda a, b, t: slerp(a, b, t))


CHAPTER_08 = Chapter("08", "08_views", "interpolating noise",
                     {"slerp": check_slerp}, reference_08)


# ----------------------------------------------------------------------------------------------
# 09 break it: predictions the learner makes before looking at the pictures
# ----------------------------------------------------------------------------------------------

def _ask(impl, name):
    value = getattr(impl, name, None)
    if value is None:
        raise NotImplementedError(f"no answer yet: set {name} in the file")
    return value


def check_no_guidance(impl) -> None:
    """GUIDED_EPS: eps_uncond + s (eps_cond - eps_uncond) for 0.2, 0.5, s = 7.5; NO_GUIDANCE_CHOICE."""
    from ..samplers import cfg_denoiser

    model = lambda z_t, t, context: context[:, :1, :1, None].expand_as(z_t)   # eps = the context value
    expected = float(cfg_denoiser(model, torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.2), 7.5)(
        torch.zeros(1, 1, 1, 1), torch.zeros(1)).flatten()[0])
    compare_number("GUIDED_EPS (eps_uncond 0.2, eps_cond 0.5, guidance_scale 7.5)",
                   _ask(impl, "GUIDED_EPS"), expected, rel=1e-3)
    # (b): at guidance 1 the model samples its own conditional distribution, broad but on the data;
    # stronger guidance pulls the samples onto a thin arc (a), and 0 ignores the condition (c).
    if str(_ask(impl, "NO_GUIDANCE_CHOICE")).strip().lower() != "b":
        raise CheckFailed("NO_GUIDANCE_CHOICE: not the right letter; look again at the guidance_scale=1 row")


def check_latent_scale(impl) -> None:
    """SNR_RATIO_UNSCALED: how much the SNR at every t grows when latents miss the 0.18215 factor."""
    compare_number("SNR_RATIO_UNSCALED", _ask(impl, "SNR_RATIO_UNSCALED"), (1 / 0.18215) ** 2, rel=0.01)


def check_beta_schedule(impl) -> None:
    """ABAR_500_LINEAR and ABAR_500_SCALED: the signal fraction left at t=500 under each schedule."""
    from ..schedule import NoiseSchedule

    compare_number("ABAR_500_LINEAR", _ask(impl, "ABAR_500_LINEAR"),
                   float(NoiseSchedule.linear().alphas_cumprod[500]), rel=0.01)
    compare_number("ABAR_500_SCALED", _ask(impl, "ABAR_500_SCALED"),
                   float(NoiseSchedule.sd().alphas_cumprod[500]), rel=0.01)


def check_eps_v(impl) -> None:
    """X0_GAIN_V_AS_EPS: the factor on x0 in the sampler's x0 estimate when a v output is read as eps, at abar=0.5."""
    a = s = math.sqrt(0.5)
    # x0_hat = (z_t - s v) / a with z_t = a x0 + s eps and v = a eps - s x0: the x0 coefficient.
    compare_number("X0_GAIN_V_AS_EPS", _ask(impl, "X0_GAIN_V_AS_EPS"), (a + s * s) / a, rel=0.01)


def check_no_ema(impl) -> None:
    """EMA_INIT_SHARE: the weight of the initial parameters in an EMA (decay 0.999) after 100 steps."""
    compare_number("EMA_INIT_SHARE", _ask(impl, "EMA_INIT_SHARE"), 0.999**100, rel=0.01)


def reference_09():
    return SimpleNamespace(GUIDED_EPS=0.2 + 7.5 * (0.5 - 0.2), NO_GUIDANCE_CHOICE="b",
                           SNR_RATIO_UNSCALED=(1 / 0.18215) ** 2,
                           ABAR_500_LINEAR=0.0778, ABAR_500_SCALED=0.2763,
                           X0_GAIN_V_AS_EPS=1 + math.sqrt(0.5), EMA_INIT_SHARE=0.999**100)


CHAPTER_09 = Chapter("09", "09_break_it", "break it: predictions",
                     {"no guidance": check_no_guidance, "wrong latent scale": check_latent_scale,
                      "wrong beta schedule": check_beta_schedule, "eps vs v": check_eps_v,
                      "no EMA": check_no_ema}, reference_09)
