"""Check your exercises: `python -m minildm.check 03` runs chapter 03's checks on your code.

Each chapter has an exercise file, lessons/exercises/exNN_topic.py, in which you write the key
function(s) of that chapter yourself. The checks here call your functions and compare them with the
reference implementation in the package (the same properties the package's own tests assert), then
report, per exercise, PASS, FAIL (with exactly what differs: the inputs, the shapes, the largest
difference and where it is) or TODO (the stub still raises NotImplementedError).

    python -m minildm.check --list                 the chapters and their exercise files
    python -m minildm.check 01                     check lessons/exercises/ex01_forward_diffusion.py
    python -m minildm.check 03 --impl my_attn.py   check another file with the same function names
    python -m minildm.check all                    every chapter

The exit status is 0 only when every exercise checked passes. The test suite (tests/test_check.py)
runs the same checks on the package's own implementations, which must pass, and on deliberately wrong
answers, which must fail.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_DIR = ROOT / "lessons" / "exercises"


class CheckFailed(AssertionError):
    """A check found a difference; the message says what it is."""


@dataclass
class Result:
    """The outcome of one exercise check: status is "pass", "fail", "todo" or "error"."""

    chapter: str
    exercise: str
    status: str
    message: str = ""


@dataclass
class Chapter:
    """One chapter's exercises: the file the learner edits and the checks, by exercise name."""

    number: str
    stem: str
    title: str
    checks: dict        # exercise name -> check function(impl) that raises CheckFailed
    reference: object   # callable() -> namespace of the package's own answers

    @property
    def path(self) -> Path:
        return EXERCISE_DIR / f"ex{self.stem}.py"


# ----------------------------------------------------------------------------------------------
# Comparing tensors and describing the difference
# ----------------------------------------------------------------------------------------------

def describe(x) -> str:
    """A short description of an input for a failure message."""
    if torch.is_tensor(x):
        if x.numel() <= 6:
            return f"tensor({[round(v, 4) for v in x.flatten().tolist()]}, shape {tuple(x.shape)})"
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, float):
        return f"{x:g}"
    return repr(x)


def inputs(**kwargs) -> str:
    """Inputs of a call as `name=description, ...`."""
    return ", ".join(f"{k}={describe(v)}" for k, v in kwargs.items())


def compare(what: str, got, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Raise CheckFailed unless `got` is a tensor of the expected shape and close to `expected`."""
    if not torch.is_tensor(got):
        raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)}, "
                          f"got {type(got).__name__}")
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: shape differs: expected {tuple(expected.shape)}, got {tuple(got.shape)}")
    got64, exp64 = got.detach().double(), expected.detach().double()
    if not torch.isfinite(got64).all():
        bad = (~torch.isfinite(got64)).sum().item()
        raise CheckFailed(f"{what}: {bad} of {got.numel()} values are NaN or infinite")
    diff = (got64 - exp64).abs()
    if not (diff <= atol + rtol * exp64.abs()).all():
        worst = int(diff.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
        raise CheckFailed(
            f"{what}: values differ: max abs diff {diff.max().item():.3g} at index {index} "
            f"(expected {exp64.flatten()[worst].item():.6g}, got {got64.flatten()[worst].item():.6g}), "
            f"mean abs diff {diff.mean().item():.3g}; tolerance {atol:g} + {rtol:g}*|expected|")


def compare_number(what: str, got, expected: float, rel: float = 0.01) -> None:
    """Raise CheckFailed unless `got` is a number within `rel` (relative) of `expected`."""
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: expected a number, got {got!r}") from None
    if not math.isclose(value, expected, rel_tol=rel, abs_tol=1e-12):
        raise CheckFailed(f"{what}: {value:.6g} is not within {100 * rel:g}% of the right value")


def unchanged(what: str, before: dict, after: dict) -> None:
    """Raise CheckFailed if a function changed one of its input tensors in place."""
    for name, value in before.items():
        if not torch.equal(value, after[name]):
            raise CheckFailed(f"{what} changed its input `{name}` in place; return a new tensor instead")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


# ----------------------------------------------------------------------------------------------
# 01 forward diffusion: q_sample and x0_from_eps
# ----------------------------------------------------------------------------------------------

def _schedules():
    from .schedule import NoiseSchedule

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


# ----------------------------------------------------------------------------------------------
# 02 sampling: one DDIM step and the guidance combination
# ----------------------------------------------------------------------------------------------

def check_ddim_step(impl) -> None:
    """ddim_step reproduces the package's sample_ddim step by step (eta=0) and DDIM eq. 12 (eta>0)."""
    from .samplers import sample_ddim
    from .schedule import NoiseSchedule

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
    from .samplers import cfg_denoiser

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


def reference_02():
    from .samplers import _ddim_step, cfg_denoiser

    def guidance(eps_uncond, eps_cond, guidance_scale):
        # cfg_denoiser on a model that returns the given predictions for context 1 and 0.
        def model(z_t, t, context):
            pick = context[:, :1, :1, None]                        # (B, 1, 1, 1): 1 cond, 0 uncond
            return pick * eps_cond.repeat(2, 1, 1, 1)[: len(pick)] + \
                (1 - pick) * eps_uncond.repeat(2, 1, 1, 1)[: len(pick)]
        n = eps_cond.shape[0]
        fn = cfg_denoiser(model, torch.ones(n, 1, 1), torch.zeros(n, 1, 1), guidance_scale)
        return fn(torch.zeros_like(eps_cond), torch.zeros(n))

    def ddim_step(z_t, eps_pred, alpha_cumprod_t, alpha_cumprod_prev, eta, noise):
        a, a_prev = torch.tensor(alpha_cumprod_t), torch.tensor(alpha_cumprod_prev)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()   # as sample_ddim does
        z_prev, _ = _ddim_step(z_t, eps_pred, a, a_prev, sigma)
        return z_prev + sigma * noise if eta > 0 else z_prev

    return SimpleNamespace(ddim_step=ddim_step, guidance=guidance)


# ----------------------------------------------------------------------------------------------
# 03 the UNet: scaled dot-product attention and multi-head cross-attention
# ----------------------------------------------------------------------------------------------

def _tiny_attention(seed=0):
    from .unet import Attention

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


def check_cross_attention(impl) -> None:
    """cross_attention(module, x, context) equals the package's Attention module's forward."""
    module = _tiny_attention()
    x, context = _randn(2, 10, 16, seed=15), _randn(2, 7, 12, seed=16)
    with torch.no_grad():
        expected = module(x, context)
        got = impl.cross_attention(module, x, context)
    compare(f"cross_attention(Attention(query_dim=16, context_dim=12, num_heads=4), "
            f"{inputs(x=x, context=context)})", got, expected)


def reference_03():
    from .unet import Attention

    def attention(q, k, v):
        # The package's Attention module in its explicit (record) mode, with projections that pass
        # q through and pick k and v out of one context made of both.
        B, nh, N, hd = q.shape
        C = nh * hd
        module = Attention(C, 2 * C, nh, dropout=0.0).eval()
        eye, zero = torch.eye(C), torch.zeros(C, C)
        with torch.no_grad():
            module.to_q.weight.copy_(eye)
            module.to_k.weight.copy_(torch.cat([eye, zero], dim=1))
            module.to_v.weight.copy_(torch.cat([zero, eye], dim=1))
            module.to_out[0].weight.copy_(eye)
            module.to_out[0].bias.zero_()
        caught = []
        module.record = lambda name, weights: caught.append(weights)
        flat = lambda a: a.transpose(1, 2).reshape(B, a.shape[2], C)          # (B, N, nh*hd)
        with torch.no_grad():
            out = module(flat(q), torch.cat([flat(k), flat(v)], dim=-1))
        return out.view(B, N, nh, hd).transpose(1, 2), caught[-1]             # (B, nh, N, hd)

    def cross_attention(module, x, context):
        return module(x, context)

    return SimpleNamespace(attention=attention, cross_attention=cross_attention)


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
    from .tokenizer import CLIPTokenizer

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


def _bare_tokenizer(bpe_ranks):
    """A CLIPTokenizer with only a merge table: enough for its BPE loop."""
    from .tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.__new__(CLIPTokenizer)
    tok.bpe_ranks = dict(bpe_ranks)
    return tok


def reference_04():
    def word_of(symbols):  # the tokenizer starts from a word; symbols are its characters
        return "".join(symbols)[: -len("</w>")]

    def bpe(symbols, bpe_ranks):
        return _bare_tokenizer(bpe_ranks).bpe_steps(word_of(symbols))[-1]

    def merge_pair(symbols, pair):
        # One step of the tokenizer's loop with a table holding only this pair.
        steps = _bare_tokenizer({tuple(pair): 0}).bpe_steps(word_of(symbols))
        return steps[1] if len(steps) > 1 else tuple(symbols)

    return SimpleNamespace(bpe=bpe, merge_pair=merge_pair)


# ----------------------------------------------------------------------------------------------
# 05 the VAE: the reparameterisation trick and the Gaussian KL
# ----------------------------------------------------------------------------------------------

def _posterior():
    from .vae import DiagonalGaussian

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
    from .vae import DiagonalGaussian

    def reparameterize(mean, logvar, noise):
        post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
        return post.mean + post.std * noise

    def gaussian_kl(mean, logvar):
        return DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()

    return SimpleNamespace(reparameterize=reparameterize, gaussian_kl=gaussian_kl)


# ----------------------------------------------------------------------------------------------
# 06 training: the loss and the EMA of the weights
# ----------------------------------------------------------------------------------------------

def check_training_loss(impl) -> None:
    """training_loss(model, schedule, z0, context, t, noise) equals steps.diffusion_loss."""
    from .schedule import NoiseSchedule
    from .steps import diffusion_loss

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
    from .steps import EMA

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
    from .steps import EMA, diffusion_loss

    def training_loss(model, schedule, z0, context, t, noise):
        return diffusion_loss(model, schedule, z0, context, t, noise)

    def ema_update(shadow, weights, decay, num_updates):
        holder = torch.nn.Module()
        for i, k in enumerate(weights):
            holder.register_buffer(f"w{i}", weights[k].clone())
        ema = EMA(holder, decay)
        ema.shadow = {f"w{i}": shadow[k].clone() for i, k in enumerate(weights)}
        ema.num_updates = num_updates - 1
        ema.update(holder)
        return {k: ema.shadow[f"w{i}"] for i, k in enumerate(weights)}

    return SimpleNamespace(training_loss=training_loss, ema_update=ema_update)


# ----------------------------------------------------------------------------------------------
# 07 Stable Diffusion: the checkpoint's EMA key names and picking the UNet's weights
# ----------------------------------------------------------------------------------------------

def _unet_keys():
    from .unet import UNet, UNetConfig

    return list(UNet(UNetConfig.tiny()).state_dict())


def check_ema_key(impl) -> None:
    """ema_key(unet_key) equals convert.ema_key for every key of a tiny UNet."""
    from . import convert

    for key in _unet_keys():
        expected = convert.ema_key(key)
        got = impl.ema_key(key)
        if got != expected:
            raise CheckFailed(f"ema_key({key!r}): expected {expected!r}, got {got!r}")


def check_unet_weights(impl) -> None:
    """unet_weights(state, use_ema) picks the same tensors as convert.split_original."""
    from . import convert

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
    from . import convert

    def unet_weights(state, use_ema):
        ckpt = convert.split_original(state)
        return ckpt.ema_unet if (use_ema and ckpt.ema_unet is not None) else ckpt.unet

    return SimpleNamespace(ema_key=convert.ema_key, unet_weights=unet_weights)


# ----------------------------------------------------------------------------------------------
# 08 views: spherical interpolation
# ----------------------------------------------------------------------------------------------

def check_slerp(impl) -> None:
    """slerp(a, b, t) equals views.slerp on whole noises; ends at a and b; keeps the norm of equal-norm inputs."""
    from .views.core import slerp

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
    from .views.core import slerp

    return SimpleNamespace(slerp=lambda a, b, t: slerp(a, b, t))


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
    from .samplers import cfg_denoiser

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
    from .schedule import NoiseSchedule

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


# ----------------------------------------------------------------------------------------------
# The chapters, running them, and the command line
# ----------------------------------------------------------------------------------------------

CHAPTERS = {c.number: c for c in [
    Chapter("01", "01_forward_diffusion", "the forward process",
            {"q_sample": check_q_sample, "x0_from_eps": check_x0_from_eps}, reference_01),
    Chapter("02", "02_sampling", "sampling",
            {"ddim_step": check_ddim_step, "guidance": check_guidance}, reference_02),
    Chapter("03", "03_unet", "attention in the UNet",
            {"attention": check_attention, "cross_attention": check_cross_attention}, reference_03),
    Chapter("04", "04_text_encoder", "byte-pair encoding",
            {"merge_pair": check_merge_pair, "bpe": check_bpe}, reference_04),
    Chapter("05", "05_vae", "the VAE's posterior",
            {"reparameterize": check_reparameterize, "gaussian_kl": check_gaussian_kl}, reference_05),
    Chapter("06", "06_training", "the training step",
            {"training_loss": check_training_loss, "ema_update": check_ema_update}, reference_06),
    Chapter("07", "07_stable_diffusion", "checkpoint keys",
            {"ema_key": check_ema_key, "unet_weights": check_unet_weights}, reference_07),
    Chapter("08", "08_views", "interpolating noise",
            {"slerp": check_slerp}, reference_08),
    Chapter("09", "09_break_it", "break it: predictions",
            {"no guidance": check_no_guidance, "wrong latent scale": check_latent_scale,
             "wrong beta schedule": check_beta_schedule, "eps vs v": check_eps_v,
             "no EMA": check_no_ema}, reference_09),
]}


def load_impl(path) -> object:
    """Import a Python file as a module (the learner's exercise file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_chapter(number: str, impl=None) -> list:
    """Run a chapter's checks on `impl` (a module or namespace; default: its exercise file)."""
    chapter = CHAPTERS[number]
    if impl is None:
        impl = load_impl(chapter.path)
    results = []
    for name, check in chapter.checks.items():
        try:
            check(impl)
            results.append(Result(number, name, "pass"))
        except NotImplementedError as e:
            results.append(Result(number, name, "todo", str(e) or "not implemented yet (the stub still "
                                                                  "raises NotImplementedError)"))
        except CheckFailed as e:
            results.append(Result(number, name, "fail", str(e)))
        except AttributeError as e:
            results.append(Result(number, name, "fail", f"missing from your file: {e}"))
        except Exception as e:  # the learner's code crashed: show where, briefly
            frames = traceback.extract_tb(e.__traceback__)
            own = [f for f in frames if f.filename == getattr(impl, "__file__", None)]
            where = own[-1] if own else frames[-1]
            results.append(Result(number, name, "error", f"{type(e).__name__}: {e} "
                                  f"(at {Path(where.filename).name}:{where.lineno})"))
    return results


def format_results(results) -> str:
    """One line per exercise, with the failure message indented below it."""
    marks = {"pass": "PASS", "fail": "FAIL", "todo": "TODO", "error": "ERROR"}
    lines = []
    for r in results:
        lines.append(f"[{marks[r.status]:5}] {r.chapter} {r.exercise}")
        if r.message:
            lines.append(f"        {r.message}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import Parser

    parser = Parser(
        prog="python -m minildm.check",
        description="Check the exercises of a chapter against the reference implementation in minildm.")
    parser.add_argument("chapter", nargs="?", help="chapter number (e.g. 03) or 'all'")
    parser.add_argument("--impl", help="check this Python file instead of lessons/exercises/exNN_*.py")
    parser.add_argument("--list", action="store_true", help="list the chapters and their exercise files")
    args = parser.parse_args(argv)

    if args.list or not args.chapter:
        for c in CHAPTERS.values():
            rel = c.path.relative_to(ROOT)
            print(f"{c.number}  {c.title:28}  {rel}  ({', '.join(c.checks)})")
        return 0
    wanted = list(CHAPTERS) if args.chapter == "all" else [args.chapter.zfill(2)]
    unknown = [w for w in wanted if w not in CHAPTERS]
    from .cli import USAGE, check_readable_file, fail, usage

    if unknown:
        fail(f"no exercises for chapter {args.chapter}; chapters: {', '.join(CHAPTERS)} or all", USAGE)
    if args.impl and len(wanted) > 1:
        fail(f"--impl {args.impl}: checks one chapter at a time, not all", USAGE)
    check_readable_file("--impl", args.impl)
    if args.impl and not args.impl.endswith(".py"):
        usage("--impl", args.impl, "must be a Python file (.py)")
    results = []
    for number in wanted:
        try:
            impl = load_impl(args.impl) if args.impl else None
            results += run_chapter(number, impl)
        except Exception as e:  # the file itself does not import
            results.append(Result(number, "(import)", "error", f"cannot load the exercise file: "
                                  f"{type(e).__name__}: {e}"))
    print(format_results(results))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "todo", "error")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['todo']} not implemented yet")
    return 0 if counts["pass"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
