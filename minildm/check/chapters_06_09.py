"""The checks of chapters 06-09 (training, checkpoints, views, break it), each against the package's own function."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .compare import Chapter, CheckFailed, inputs, compare, compare_number, unchanged, _gen, _randn
from .chapters_01_05 import _FakeConditionalModel, _ddim_eps, _randomized, _short


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


_LDM = []


def _tiny_ldm():
    """A LatentDiffusion of tiny random models (built once): what img2img and inpainting run on."""
    if not _LDM:
        from ..clip_text import CLIPTextConfig, CLIPTextModel
        from ..ldm import LatentDiffusion
        from ..tokenizer import CLIPTokenizer
        from ..unet import UNet, UNetConfig
        from ..vae import AutoencoderKL, VAEConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = _randomized(UNet(UNetConfig.tiny()), 1)
            vae = _randomized(AutoencoderKL(VAEConfig.tiny()), 2)
            text = _randomized(CLIPTextModel(CLIPTextConfig.tiny()), 3)
        _LDM.append(LatentDiffusion(unet, vae, text, CLIPTokenizer.default(context_length=16)).eval())
    return _LDM[0]


def check_img2img_start(impl) -> None:
    """img2img_start(z0, noise, alphas_cumprod, timesteps, strength) gives the first step and the starting
    latent that LatentDiffusion.generate(init_image=..., strength=...) hands its DDIM sampler."""
    from ..samplers import ddim_timesteps

    ldm = _tiny_ldm()
    z0, noise, starts = _img2img_starts()
    for num_steps, strength, seen in starts:
        timesteps = ddim_timesteps(ldm.schedule, num_steps).tolist()
        got = impl.img2img_start(z0.clone(), noise.clone(), ldm.schedule.alphas_cumprod, timesteps, strength)
        what = (f"img2img_start({inputs(z0=z0, noise=noise)}, alphas_cumprod of sd(), timesteps={_short(timesteps)}, "
                f"strength={strength})")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(what + ": should return a pair (first_step, z)")
        first_step, z = got
        if int(first_step) != seen["step"]:
            raise CheckFailed(f"{what}: first_step is {int(first_step)}, but generate starts its "
                              f"{num_steps}-step sampler at step {seen['step']} (timestep "
                              f"{int(seen['t'])}); it runs the last `strength` fraction of the steps, "
                              f"rounded down")
        compare(what + " starting latent, compared with the z_t generate's sampler starts from", z,
                seen["z_t"], atol=1e-5)


class _Seen(Exception):
    """Raised by a callback to stop generate once it has shown the first step."""


_STARTS = []


def _img2img_starts():
    """The clean latents z0 and the noise of a tiny img2img run, and [(num_steps, strength, the first callback
    dict of generate's DDIM sampler)] for several step counts and strengths (computed once)."""
    if not _STARTS:
        ldm = _tiny_ldm()
        init = torch.rand(1, 3, 16, 16, generator=_gen(110)) * 2 - 1
        noise = _randn(1, 4, 8, 8, seed=111)

        def stop(info):
            raise _Seen(info)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: more threads only wait for each other (20x slower on a busy CPU)
        try:
            z0 = ldm._encode_init_image(init, 1, _gen(112))  # the posterior sample generate draws first
            starts = []
            for num_steps, strength in ((10, 0.8), (10, 0.75), (10, 1.0), (10, 0.3), (7, 0.5), (7, 0.15),
                                        (50, 0.62)):
                try:
                    ldm.generate("a cat", init_image=init, strength=strength, num_steps=num_steps, sampler="ddim",
                                 guidance_scale=1.0, generator=_gen(112), latents=noise, output_type="latent",
                                 callback=stop)
                except _Seen as seen:
                    starts.append((num_steps, strength, seen.args[0]))
                else:
                    raise CheckFailed(f"generate(strength={strength}, num_steps={num_steps}) ran no sampler step")
        finally:
            torch.set_num_threads(threads)
        _STARTS.extend([z0, noise, starts])
    return _STARTS


def check_inpaint_eps(impl) -> None:
    """inpaint_eps gives the eps of LatentDiffusion._inpainting's denoiser at every timestep, feeds the model
    the blend, and returns outside the mask exactly the eps whose x0 estimate is the original latent."""
    ldm = _tiny_ldm()
    schedule = ldm.schedule
    z0, noise = _randn(2, 4, 6, 6, seed=120), _randn(2, 4, 6, 6, seed=121)
    elsewhere, its_noise = _randn(2, 4, 6, 6, seed=122), _randn(2, 4, 6, 6, seed=123)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1:4, 2:6] = 1
    mask[1, :, 3:, :] = 1
    for step in (981, 500, 21, 1):
        t = torch.full((2,), float(step))
        a = schedule.alphas_cumprod[step]
        z_t = a.sqrt() * elsewhere + (1 - a).sqrt() * its_noise  # a sampler's latent, at t's noise level
        seen = []

        def eps_fn(z, t):
            seen.append(z)
            return _ddim_eps(z, t)

        expected = ldm._inpainting(_ddim_eps, z0, noise, mask)(z_t, t)
        got = impl.inpaint_eps(eps_fn, z_t.clone(), t.clone(), z0.clone(), noise.clone(), mask.clone(),
                               schedule.alphas_cumprod)
        what = (f"inpaint_eps(eps_fn, {inputs(z_t=z_t)}, t={step}, {inputs(z0=z0, noise=noise)}, mask of shape "
                f"{tuple(mask.shape)} (1 = repaint), alphas_cumprod of sd())")
        if len(seen) != 1:
            raise CheckFailed(f"{what}: called eps_fn {len(seen)} times; call it once, on the blended latent")
        blend = mask * z_t + (1 - mask) * (a.sqrt() * z0 + (1 - a).sqrt() * noise)
        compare(what + ": the latent eps_fn was given", seen[0], blend, atol=1e-4)
        compare(what, got, expected, atol=1e-4, rtol=1e-4)
        x0_pred = (z_t - (1 - a).sqrt() * got) / a.sqrt()
        compare(what + ": outside the mask, the x0 estimate of your eps should be the original latent z0",
                (1 - mask) * x0_pred, (1 - mask) * z0, atol=1e-3)


def check_lora_merge(impl) -> None:
    """lora_merge(weight, down, up, alpha, scale) equals lora.LoraLayer.add_to: a linear layer, a 1x1 and a
    3x3 convolution (3x3 down, 1x1 up), with and without alpha; the weight given is not changed."""
    from ..lora import LoraLayer

    cases = [("Linear 10 -> 12", (12, 10), (4, 10), (12, 4), 2.0, 0.8),
             ("Linear 10 -> 12, no alpha", (12, 10), (4, 10), (12, 4), None, 1.0),
             ("Conv2d 6 -> 8, 1x1", (8, 6, 1, 1), (3, 6, 1, 1), (8, 3, 1, 1), 1.0, 0.5),
             ("Conv2d 6 -> 8, 3x3", (8, 6, 3, 3), (2, 6, 3, 3), (8, 2, 1, 1), 8.0, 1.5),
             ("Conv2d 6 -> 8, 3x3, no alpha", (8, 6, 3, 3), (5, 6, 3, 3), (8, 5, 1, 1), None, -0.7)]
    for i, (label, w_shape, d_shape, u_shape, alpha, scale) in enumerate(cases):
        weight = _randn(*w_shape, seed=130 + i)
        down, up = _randn(*d_shape, seed=140 + i), _randn(*u_shape, seed=150 + i)
        expected = weight.clone()
        LoraLayer("unet", "layer.weight", down, up, alpha).add_to(expected, scale)
        given = weight.clone()
        got = impl.lora_merge(given, down.clone(), up.clone(), alpha, scale)
        what = (f"lora_merge(weight {w_shape} of a {label}, down A {d_shape}, up B {u_shape}, alpha={alpha}, "
                f"scale={scale})")
        compare(what, got, expected, atol=1e-4)
        unchanged("lora_merge", dict(weight=weight), dict(weight=given))
    compare("lora_merge(..., scale=0) should give the weight back", impl.lora_merge(weight, down, up, 4.0, 0.0),
            weight)


def reference_07():
    from .. import convert
    from ..lora import LoraLayer

    def unet_weights(state, use_ema):
        ckpt = convert.split_original(state)
        return ckpt.ema_unet if (use_ema and ckpt.ema_unet is not None) else ckpt.unet

    def img2img_start(z0, noise, alphas_cumprod, timesteps, strength):
        # as LatentDiffusion.generate picks the first step and samplers.noise_level its abar (DDIM's grid)
        first_step = len(timesteps) - int(len(timesteps) * strength)
        a = float(alphas_cumprod[timesteps[first_step]])
        return first_step, math.sqrt(a) * z0 + math.sqrt(1 - a) * noise

    def inpaint_eps(eps_fn, z_t, t, z0, noise, mask, alphas_cumprod):
        # The check passes SD's alphas_cumprod, which is the tiny model's schedule.
        return _tiny_ldm()._inpainting(eps_fn, z0, noise, mask)(z_t, t)

    def lora_merge(weight, down, up, alpha, scale):
        merged = weight.clone()
        LoraLayer("unet", "layer.weight", down, up, alpha).add_to(merged, scale)
        return merged

    return SimpleNamespace(ema_key=convert.ema_key, unet_weights=unet_weights, lora_merge=lora_merge,
                           img2img_start=img2img_start, inpaint_eps=inpaint_eps)


CHAPTER_07 = Chapter("07", "07_stable_diffusion", "Stable Diffusion",
                     {"ema_key": check_ema_key, "unet_weights": check_unet_weights, "lora_merge": check_lora_merge,
                      "img2img_start": check_img2img_start, "inpaint_eps": check_inpaint_eps}, reference_07)


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
