"""The checks of chapters 01-05 (the model's parts), each against the package's own function."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .compare import Chapter, CheckFailed, inputs, compare, unchanged, _gen, _randn


# ----------------------------------------------------------------------------------------------
# 01 forward diffusion: q_sample and x0_from_eps
# ----------------------------------------------------------------------------------------------

def _schedules():
    from ..schedule import NoiseSchedule

    return {"sd()": NoiseSchedule.sd(), "linear()": NoiseSchedule.linear(),
            "cosine()": NoiseSchedule.cosine()}


def check_q_sample(impl) -> None:
    """q_sample(schedule, x0, t, noise) equals NoiseSchedule.q_sample on three schedules."""
    x0, noise = _randn(4, 3, 8, 8, seed=1), _randn(4, 3, 8, 8, seed=2)
    t = torch.tensor([0, 250, 500, 999])
    for label, schedule in _schedules().items():
        args = dict(x0=x0.clone(), t=t.clone(), noise=noise.clone())
        got = impl.q_sample(schedule, **args)
        what = f"q_sample(schedule={label}, {inputs(x0=x0, t=t, noise=noise)})"
        compare(what, got, schedule.q_sample(x0, t, noise))
        unchanged("q_sample", dict(x0=x0, t=t, noise=noise), args)
    # An int timestep applies to the whole batch, and t = 0 leaves almost only the signal.
    schedule = _schedules()["sd()"]
    got = impl.q_sample(schedule, x0, 0, noise)
    compare(f"q_sample(schedule=sd(), {inputs(x0=x0, t=0, noise=noise)})", got,
            schedule.q_sample(x0, 0, noise))


def check_x0_from_eps(impl) -> None:
    """x0_from_eps(schedule, z_t, t, eps) inverts q_sample and equals NoiseSchedule.x0_from_eps."""
    x0, noise = _randn(4, 3, 8, 8, seed=3), _randn(4, 3, 8, 8, seed=4)
    t = torch.tensor([0, 100, 600, 900])
    for label, schedule in _schedules().items():
        z_t = schedule.q_sample(x0, t, noise)
        got = impl.x0_from_eps(schedule, z_t, t, noise)
        compare(f"x0_from_eps(schedule={label}, {inputs(z_t=z_t, t=t, eps=noise)})", got,
                schedule.x0_from_eps(z_t, t, noise), atol=1e-4)
        compare(f"x0_from_eps(schedule={label}, q_sample(x0, t, eps), t, eps) should give back x0",
                got, x0, atol=1e-3)


def reference_01():
    return SimpleNamespace(
        q_sample=lambda schedule, x0, t, noise: schedule.q_sample(x0, t, noise),
        x0_from_eps=lambda schedule, z_t, t, eps: schedule.x0_from_eps(z_t, t, eps),
    )


CHAPTER_01 = Chapter("01", "01_forward_diffusion", "the forward process",
                     {"q_sample": check_q_sample, "x0_from_eps": check_x0_from_eps}, reference_01)


# ----------------------------------------------------------------------------------------------
# 02 sampling: one DDIM step and the guidance combination
# ----------------------------------------------------------------------------------------------

def check_ddim_step(impl) -> None:
    """ddim_step reproduces the package's sample_ddim step by step (eta=0) and DDIM eq. 12 (eta>0)."""
    from ..samplers import sample_ddim
    from ..schedule import NoiseSchedule

    schedule = NoiseSchedule.sd()
    ac = schedule.alphas_cumprod
    eps_map = torch.tensor([0.9, -0.4, 0.2]).view(1, 3, 1, 1)

    def eps_fn(z_t, t):  # a smooth, t-dependent stand-in for a trained UNet
        return torch.tanh(z_t * eps_map + t.view(-1, 1, 1, 1) / 1000)

    caught = []
    z = _randn(2, 3, 4, 4, seed=5)
    final = sample_ddim(eps_fn, z, schedule, 10, eta=0.0,
                        callback=lambda info: caught.append(dict(info)))
    for i, info in enumerate(caught):
        t = int(round(float(torch.as_tensor(info["t"]).flatten()[0])))
        if i + 1 < len(caught):
            t_prev = int(round(float(torch.as_tensor(caught[i + 1]["t"]).flatten()[0])))
            a_prev, expected = float(ac[t_prev]), caught[i + 1]["z_t"]
        else:
            a_prev, expected = float(schedule.alphas_cumprod[0]), final
        got = impl.ddim_step(info["z_t"], info["eps_pred"], float(ac[t]), a_prev, 0.0, None)
        what = (f"step {i} of sample_ddim(num_steps=10, eta=0) on sd(): ddim_step(z_t at t={t}, eps_pred, "
                f"alpha_cumprod_t={float(ac[t]):.5f}, alpha_cumprod_prev={a_prev:.5f}, eta=0)")
        compare(what, got, expected, atol=1e-4)

    # eta > 0: the stochastic step of DDIM eq. 12 with sigma from eq. 16, given the noise.
    z_t, eps, noise = _randn(2, 3, 4, 4, seed=6), _randn(2, 3, 4, 4, seed=7), _randn(2, 3, 4, 4, seed=8)
    for a_t, a_prev, eta in ((0.3, 0.5, 0.5), (0.05, 0.2, 1.0), (0.6, 0.9, 0.0)):
        got = impl.ddim_step(z_t, eps, a_t, a_prev, eta, noise)
        expected = _ddim_step_reference(z_t, eps, a_t, a_prev, eta, noise)
        what = (f"ddim_step({inputs(z_t=z_t, eps_pred=eps)}, alpha_cumprod_t={a_t}, "
                f"alpha_cumprod_prev={a_prev}, eta={eta}, noise=tensor of shape {tuple(noise.shape)})")
        compare(what, got, expected, atol=1e-5)


def _ddim_step_reference(z_t, eps, a_t, a_prev, eta, noise):
    # Written out independently of samplers.py (which has the whole loop, not a step function).
    x0 = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    return out + sigma * noise if sigma > 0 else out


class _FakeConditionalModel(torch.nn.Module):
    """model(z_t, t, context) -> eps that depends on all three, to test guidance wrappers."""

    def forward(self, z_t, t, context):
        t = torch.as_tensor(t, dtype=z_t.dtype).reshape(-1)
        t = t.expand(z_t.shape[0]) if t.numel() == 1 else t
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.sin(z_t + c) * (1 + t.view(-1, 1, 1, 1) / 1000)


def check_guidance(impl) -> None:
    """guidance(eps_uncond, eps_cond, scale) matches cfg_denoiser's output for the same model."""
    from ..samplers import cfg_denoiser

    model = _FakeConditionalModel()
    z_t, t = _randn(2, 4, 4, 4, seed=9), torch.tensor([500.0, 20.0])
    context, uncond = _randn(2, 7, 8, seed=10), _randn(2, 7, 8, seed=11)
    eps_cond, eps_uncond = model(z_t, t, context), model(z_t, t, uncond)
    for scale in (1.0, 7.5, 0.0, 3.0):
        expected = cfg_denoiser(model, context, uncond, scale)(z_t, t)
        got = impl.guidance(eps_uncond.clone(), eps_cond.clone(), scale)
        what = (f"guidance({inputs(eps_uncond=eps_uncond, eps_cond=eps_cond)}, guidance_scale={scale}) "
                f"compared with cfg_denoiser(model, context, uncond_context, {scale})(z_t, t)")
        compare(what, got, expected, atol=1e-5)


def _ddim_eps(z_t, t):
    """A smooth, t-dependent, nonlinear stand-in for a trained UNet."""
    t = t.reshape(-1, *([1] * (z_t.ndim - 1))) / 1000.0
    return torch.tanh(0.8 * z_t + 0.3 * z_t.roll(1, dims=-1)) * (0.5 + t) + 0.1 * torch.cos(5 * t)


def check_ddim_sample(impl) -> None:
    """ddim_sample, the whole loop, ends where samplers.sample_ddim ends with the same start and generator,
    for eta 0, 0.5 and 1; at eta 0 the generator plays no part."""
    from ..samplers import ddim_timesteps, sample_ddim
    from ..schedule import NoiseSchedule

    schedule = NoiseSchedule.sd()
    for num_steps, eta in ((10, 0.0), (10, 0.5), (25, 1.0), (4, 0.3)):
        z = _randn(2, 3, 5, 5, seed=60 + num_steps)
        timesteps = ddim_timesteps(schedule, num_steps).tolist()
        expected = sample_ddim(_ddim_eps, z, schedule, num_steps, eta=eta, generator=_gen(70))
        given = z.clone()
        got = impl.ddim_sample(_ddim_eps, given, schedule.alphas_cumprod, timesteps, eta, _gen(70))
        what = (f"ddim_sample(eps_fn, {inputs(z=z)}, alphas_cumprod of sd(), timesteps={_short(timesteps)}, "
                f"eta={eta}, generator seeded 70) compared with sample_ddim(..., num_steps={num_steps}, eta={eta})")
        compare(what, got, expected, atol=1e-4)
        unchanged("ddim_sample", dict(z=z), dict(z=given))
    z = _randn(2, 3, 5, 5, seed=61)
    timesteps = ddim_timesteps(schedule, 10).tolist()
    first = impl.ddim_sample(_ddim_eps, z.clone(), schedule.alphas_cumprod, timesteps, 0.0, _gen(1))
    second = impl.ddim_sample(_ddim_eps, z.clone(), schedule.alphas_cumprod, timesteps, 0.0, _gen(2))
    compare("ddim_sample with eta=0 and two different generators: eta = 0 adds no noise, so the results "
            "must be equal", second, first, atol=1e-6)


def _short(values) -> str:
    values = list(values)
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)} steps)"


class _CountingModel(_FakeConditionalModel):
    """The fake conditional model, counting its calls and the batch size of each."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, z_t, t, context):
        self.batches.append(z_t.shape[0])
        return super().forward(z_t, t, context)


def check_cfg_denoiser(impl) -> None:
    """cfg_denoiser(model, context, uncond_context, scale) gives samplers.cfg_denoiser's eps, from one
    batched model call per step."""
    from ..samplers import cfg_denoiser

    z_t, t = _randn(3, 4, 4, 4, seed=80), torch.tensor([700.0, 700.0, 700.0])
    context = _randn(3, 7, 8, seed=81)
    for uncond in (_randn(3, 7, 8, seed=82), _randn(1, 7, 8, seed=83)):
        for scale in (7.5, 1.0, 0.0, 3.0):
            model = _CountingModel()
            expected = cfg_denoiser(_FakeConditionalModel(), context, uncond, scale)(z_t, t)
            eps_fn = impl.cfg_denoiser(model, context.clone(), uncond.clone(), scale)
            got = eps_fn(z_t.clone(), t.clone())
            what = (f"cfg_denoiser(model, {inputs(context=context, uncond_context=uncond)}, guidance_scale={scale})"
                    f"({inputs(z_t=z_t, t=t)})")
            compare(what, got, expected, atol=1e-5)
            if scale != 1.0 and model.batches != [2 * z_t.shape[0]]:
                raise CheckFailed(f"{what}: the model was called {len(model.batches)} time(s) with batch sizes "
                                  f"{model.batches}; make one call on a batch of {2 * z_t.shape[0]} (the "
                                  f"unconditional and the conditional halves together)")


def reference_02():
    from ..samplers import cfg_denoiser, ddim_sigma, ddim_step, guidance, noise_like

    def ddim_step_with_eta(z_t, eps_pred, alpha_cumprod_t, alpha_cumprod_prev, eta, noise):
        a, a_prev = torch.tensor(alpha_cumprod_t), torch.tensor(alpha_cumprod_prev)
        return ddim_step(z_t, eps_pred, a, a_prev, ddim_sigma(a, a_prev, eta), noise if eta > 0 else None)[0]

    def ddim_sample(eps_fn, z, alphas_cumprod, timesteps, eta, generator):
        for i, t in enumerate(timesteps):
            a = alphas_cumprod[t]
            a_prev = alphas_cumprod[timesteps[i + 1] if i + 1 < len(timesteps) else 0]
            eps_pred = eps_fn(z, torch.full((z.shape[0],), float(t)))
            noise = noise_like(z, generator) if eta > 0 else None
            z = ddim_step(z, eps_pred, a, a_prev, ddim_sigma(a, a_prev, eta), noise)[0]
        return z

    return SimpleNamespace(ddim_step=ddim_step_with_eta, guidance=guidance, ddim_sample=ddim_sample,
                           cfg_denoiser=cfg_denoiser)


CHAPTER_02 = Chapter("02", "02_sampling", "sampling",
                     {"ddim_step": check_ddim_step, "ddim_sample": check_ddim_sample, "guidance": check_guidance,
                      "cfg_denoiser": check_cfg_denoiser}, reference_02)


# ----------------------------------------------------------------------------------------------
# 03 the UNet: scaled dot-product attention and multi-head cross-attention
# ----------------------------------------------------------------------------------------------

def _tiny_attention(seed=0):
    from ..unet import Attention

    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
        torch.manual_seed(seed)
        return Attention(query_dim=16, context_dim=12, num_heads=4, dropout=0.0).eval()


def check_attention(impl) -> None:
    """attention(q, k, v) returns the output and the weights softmax(q k^T / sqrt(d)) of the package."""
    for shape_q, shape_kv in (((2, 4, 9, 8), (2, 4, 7, 8)), ((1, 1, 5, 3), (1, 1, 5, 3))):
        q, k, v = _randn(*shape_q, seed=12), _randn(*shape_kv, seed=13), _randn(*shape_kv, seed=14)
        out = impl.attention(q, k, v)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed("attention(q, k, v) should return a pair (output, weights)")
        got_out, got_w = out
        exp_out, exp_w = reference_03().attention(q, k, v)
        what = f"attention({inputs(q=q, k=k, v=v)})"
        compare(what + " weights", got_w, exp_w)
        compare(what + " output", got_out, exp_out)
        if not torch.allclose(got_w.sum(-1), torch.ones(()), atol=1e-5):
            raise CheckFailed(what + ": the weights of each query do not sum to 1 over the keys")


def _randomized(module, seed):
    """`module` with every parameter drawn afresh (the zero-initialised last layers too), in eval mode:
    matrices and kernels around 1/sqrt(fan-in), norm scales near 1, biases near 0."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_((p == 1).float() + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def check_timestep_embedding(impl) -> None:
    """timestep_embedding(t, dim) equals unet.timestep_embedding (cosines first, odd widths padded); at t = 0
    it is cos 0 = 1 then sin 0 = 0."""
    from ..unet import timestep_embedding

    t = torch.tensor([0.0, 1.0, 0.5, 37.25, 500.0, 999.0])
    for dim in (320, 8, 7, 2):
        got = impl.timestep_embedding(t.clone(), dim)
        compare(f"timestep_embedding({inputs(t=t)}, dim={dim})", got, timestep_embedding(t, dim), atol=1e-4)
    got = impl.timestep_embedding(torch.zeros(1), 6)
    compare("timestep_embedding(t=tensor([0.0]), dim=6): cos(0) = 1 for the first half, sin(0) = 0 for the "
            "second", got, torch.tensor([[1.0, 1, 1, 0, 0, 0]]))


def check_res_block(impl) -> None:
    """res_block(block, x, emb) equals a unet.ResBlock's forward, with and without a width change."""
    from ..unet import ResBlock

    for seed, (c_in, c_out) in enumerate(((8, 8), (8, 12))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            block = ResBlock(c_in, 16, c_out, groups=4, dropout=0.0)
        block = _randomized(block, 90 + seed)
        x, emb = _randn(2, c_in, 5, 6, seed=92), _randn(2, 16, seed=93)
        with torch.no_grad():
            expected = block(x, emb)
            got = impl.res_block(block, x.clone(), emb.clone())
        what = (f"res_block(ResBlock(channels={c_in}, emb_dim=16, out_channels={c_out}, groups=4) with random "
                f"weights, {inputs(x=x, emb=emb)})")
        compare(what, got, expected, atol=1e-4)
    # The time embedding must reach the output: the same x with another emb changes it.
    with torch.no_grad():
        other = impl.res_block(block, x, emb + 1.0)
    if torch.allclose(other, got, atol=1e-6):
        raise CheckFailed("res_block: changing emb does not change the output; the time embedding must be "
                          "added to the features inside the block")


def _attention_module(context_dim, seed):
    from ..unet import Attention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = Attention(query_dim=16, context_dim=context_dim, num_heads=4, dropout=0.0)
    return _randomized(module, 100 + seed)


def check_multi_head_attention(impl) -> None:
    """multi_head_attention from the projection weights gives unet.Attention's output and, head by head, the
    weights its `record` hook receives (cross-attention with 4 heads, and self-attention)."""
    x = _randn(2, 10, 16, seed=101)
    for self_attention in (False, True):
        module = _attention_module(16 if self_attention else 12, seed=int(self_attention))
        context = None if self_attention else _randn(2, 7, 12, seed=102)
        kv = x if context is None else context
        recorded = []
        module.record = lambda name, weights: recorded.append(weights)
        with torch.no_grad():
            expected = module(x, context)
            got = impl.multi_head_attention(x.clone(), kv.clone(), module.to_q.weight, module.to_k.weight,
                                            module.to_v.weight, module.to_out[0].weight, module.to_out[0].bias,
                                            module.num_heads)
        kind = "self-attention, context = x" if self_attention else "cross-attention"
        what = (f"multi_head_attention({inputs(x=x, context=kv)}, the weights of Attention(query_dim=16, "
                f"context_dim={kv.shape[-1]}, num_heads=4) with random weights, num_heads=4) ({kind})")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise CheckFailed(what + ": should return a pair (output, weights)")
        compare(what + " output", got[0], expected, atol=1e-5)
        compare(what + " weights (B, nh, N, M)", got[1], recorded[0], atol=1e-5)


def check_cross_attention(impl) -> None:
    """cross_attention(module, x, context) equals the package's Attention module's forward."""
    module = _randomized(_tiny_attention(), 104)
    x, context = _randn(2, 10, 16, seed=15), _randn(2, 7, 12, seed=16)
    with torch.no_grad():
        expected = module(x, context)
        got = impl.cross_attention(module, x, context)
    compare(f"cross_attention(Attention(query_dim=16, context_dim=12, num_heads=4), "
            f"{inputs(x=x, context=context)})", got, expected)


def reference_03():
    from ..unet import attention, timestep_embedding

    def multi_head_attention(x, context, w_q, w_k, w_v, w_out, b_out, num_heads):
        from ..unet import Attention

        module = Attention(x.shape[-1], context.shape[-1], num_heads, 0.0).eval()
        recorded = []
        module.record = lambda name, weights: recorded.append(weights)
        with torch.no_grad():
            for mine, given in ((module.to_q.weight, w_q), (module.to_k.weight, w_k), (module.to_v.weight, w_v),
                                (module.to_out[0].weight, w_out), (module.to_out[0].bias, b_out)):
                mine.copy_(given)
            return module(x, context), recorded[0]

    return SimpleNamespace(timestep_embedding=timestep_embedding, res_block=lambda block, x, emb: block(x, emb),
                           attention=attention, multi_head_attention=multi_head_attention,
                           cross_attention=lambda module, x, context: module(x, context))


CHAPTER_03 = Chapter("03", "03_unet", "the UNet",
                     {"timestep_embedding": check_timestep_embedding, "res_block": check_res_block,
                      "attention": check_attention, "multi_head_attention": check_multi_head_attention,
                      "cross_attention": check_cross_attention}, reference_03)


# ----------------------------------------------------------------------------------------------
# 04 the text encoder: one BPE merge loop
# ----------------------------------------------------------------------------------------------

AWKWARD_PROMPT = ("a photograph of an astronaut riding a horse, unbelievably detailed!! "
                  "café naïve 2024 aaaaaa lowlowlow")


def _start_symbols(word: str) -> tuple:
    return tuple(word[:-1]) + (word[-1] + "</w>",)


MERGE_CASES = [(("a", "a", "a", "a</w>"), ("a", "a")), (("l", "o", "w", "l", "o", "w</w>"), ("l", "o")),
               (("a", "b", "c</w>"), ("x", "y")), (("a", "a", "a</w>"), ("a", "a"))]
# A toy merge table in which the order of merges matters.
TOY_RANKS = {("b", "c"): 0, ("a", "b"): 1, ("a", "bc"): 2, ("bc", "c</w>"): 3}
TOY_WORDS = [("a", "b", "c", "c</w>"), ("a", "b", "c</w>"), ("c", "a", "b", "c", "b", "c</w>")]


def check_merge_pair(impl) -> None:
    """merge_pair(symbols, pair) merges every occurrence left to right, like the tokenizer does."""
    ref = reference_04()
    for symbols, pair in MERGE_CASES:
        expected = tuple(ref.merge_pair(symbols, pair))
        got = tuple(impl.merge_pair(tuple(symbols), tuple(pair)))
        if got != expected:
            raise CheckFailed(f"merge_pair({symbols}, {pair}): expected {expected}, got {got}")


def check_bpe(impl) -> None:
    """bpe(symbols, bpe_ranks) gives the CLIP tokenizer's pieces for every word of a prompt."""
    from ..tokenizer import CLIPTokenizer

    ref = reference_04()
    for start in TOY_WORDS:
        expected = tuple(ref.bpe(start, TOY_RANKS))
        got = tuple(impl.bpe(start, dict(TOY_RANKS)))
        if got != expected:
            raise CheckFailed(f"bpe({start}, {TOY_RANKS}): expected {expected}, got {got} "
                              f"(merge the pair with the LOWEST rank first, until no pair has a rank)")
    tok = CLIPTokenizer.default()
    for word in tok.words(AWKWARD_PROMPT):
        start = _start_symbols(word)
        got = tuple(impl.bpe(start, tok.bpe_ranks))
        expected = tok.bpe(word)
        if got != expected:
            raise CheckFailed(f"bpe({start}, CLIP's bpe_ranks) for the word {word!r}: "
                              f"expected {expected}, got {got}")


def reference_04():
    from ..tokenizer import bpe, merge_pair

    return SimpleNamespace(bpe=bpe, merge_pair=merge_pair)


CHAPTER_04 = Chapter("04", "04_text_encoder", "byte-pair encoding",
                     {"merge_pair": check_merge_pair, "bpe": check_bpe}, reference_04)


# ----------------------------------------------------------------------------------------------
# 05 the VAE: the reparameterisation trick and the Gaussian KL
# ----------------------------------------------------------------------------------------------

def _posterior():
    from ..vae import DiagonalGaussian

    moments = torch.cat([_randn(3, 4, 5, 6, seed=17), 2 * _randn(3, 4, 5, 6, seed=18) - 1], dim=1)
    return DiagonalGaussian(moments)


def check_reparameterize(impl) -> None:
    """reparameterize(mean, logvar, noise) equals DiagonalGaussian.sample with the same noise."""
    post = _posterior()
    for seed in (0, 1):
        expected = post.sample(generator=_gen(seed))
        noise = torch.randn(post.mean.shape, generator=_gen(seed))
        got = impl.reparameterize(post.mean, post.logvar, noise)
        compare(f"reparameterize({inputs(mean=post.mean, logvar=post.logvar, noise=noise)})", got, expected)
    # Gradients must flow to both mean and logvar (that is the point of the trick).
    mean = post.mean.clone().requires_grad_(True)
    logvar = post.logvar.clone().requires_grad_(True)
    z = impl.reparameterize(mean, logvar, noise)
    if z.requires_grad:
        z.sum().backward()
    for name, p in (("mean", mean), ("logvar", logvar)):
        if p.grad is None or p.grad.abs().sum() == 0:
            raise CheckFailed(f"reparameterize: no gradient reaches `{name}`; compute z from it "
                              f"with differentiable tensor operations")


def check_gaussian_kl(impl) -> None:
    """gaussian_kl(mean, logvar) equals DiagonalGaussian.kl: per sample (B,), zero for the prior."""
    post = _posterior()
    got = impl.gaussian_kl(post.mean, post.logvar)
    compare(f"gaussian_kl({inputs(mean=post.mean, logvar=post.logvar)})", got, post.kl(), atol=1e-3,
            rtol=1e-5)
    zeros = torch.zeros(2, 4, 3, 3)
    compare("gaussian_kl(mean=0, logvar=0): the KL of the prior to itself", impl.gaussian_kl(zeros, zeros),
            torch.zeros(2))
    if (impl.gaussian_kl(post.mean, post.logvar) < 0).any():
        raise CheckFailed("gaussian_kl returned a negative value; a KL divergence is never negative")


def reference_05():
    from ..vae import gaussian_kl, reparameterize

    return SimpleNamespace(reparameterize=reparameterize, gaussian_kl=gaussian_kl)


CHAPTER_05 = Chapter("05", "05_vae", "the VAE's posterior",
                     {"reparameterize": check_reparameterize, "gaussian_kl": check_gaussian_kl}, reference_05)
