"""The exercise checker: the package's own answers pass, wrong answers fail with a useful message."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minildm import check

ROOT = Path(__file__).resolve().parents[1]


def _run(number, **overrides):
    """Run a chapter's checks on the reference answers with some functions replaced."""
    impl = check.CHAPTERS[number].reference()
    for name, value in overrides.items():
        setattr(impl, name, value)
    return {r.exercise: r for r in check.run_chapter(number, impl)}


@pytest.mark.parametrize("number", list(check.CHAPTERS))
def test_reference_passes_every_check(number):
    """The package's own implementations pass every check of every chapter."""
    results = check.run_chapter(number, check.CHAPTERS[number].reference())
    failed = [r for r in results if r.status != "pass"]
    assert not failed, check.format_results(failed)


@pytest.mark.parametrize("number", list(check.CHAPTERS))
def test_exercise_files_are_clean(number):
    """Every exercise file imports and each exercise reports TODO (a stub) or PASS (solved), never an error."""
    results = check.run_chapter(number)
    assert results and all(r.status in ("todo", "pass") for r in results), check.format_results(results)


def _abar(schedule, t, like):
    a = schedule.alphas_cumprod[torch.as_tensor(t)]
    return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a


def test_q_sample_without_sqrt_fails():
    """q_sample with abar instead of sqrt(abar) fails, naming the call and the largest difference."""
    def q_sample(schedule, x0, t, noise):
        a = _abar(schedule, t, x0)
        return a * x0 + (1 - a) * noise

    r = _run("01", q_sample=q_sample)["q_sample"]
    assert r.status == "fail"
    assert "q_sample(schedule=sd()" in r.message and "max abs diff" in r.message
    assert "mean abs diff" in r.message and "shape (4, 3, 8, 8)" in r.message


def test_q_sample_in_place_fails():
    """A q_sample that writes into its input is caught."""
    def q_sample(schedule, x0, t, noise):
        a = _abar(schedule, t, x0)
        return x0.mul_(a.sqrt()).add_((1 - a).sqrt() * noise)

    r = _run("01", q_sample=q_sample)["q_sample"]
    assert r.status == "fail" and "in place" in r.message


def test_q_sample_wrong_shape_fails():
    """A result with the wrong shape reports expected and got shapes."""
    r = _run("01", q_sample=lambda schedule, x0, t, noise: x0[0])["q_sample"]
    assert r.status == "fail"
    assert "expected (4, 3, 8, 8), got (3, 8, 8)" in r.message


def test_ddim_step_with_eta_sign_wrong_fails():
    """A DDIM step that adds sigma^2 under the square root instead of subtracting it fails at eta > 0."""
    def ddim_step(z_t, eps_pred, a, a_prev, eta, noise):
        x0 = (z_t - math.sqrt(1 - a) * eps_pred) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev + sigma**2) * eps_pred
        return out + sigma * noise if eta > 0 else out

    r = _run("02", ddim_step=ddim_step)["ddim_step"]
    assert r.status == "fail"
    assert "eta=0.5" in r.message and "max abs diff" in r.message


def test_ddim_step_with_wrong_timestep_fails():
    """A DDIM step that re-noises to abar_t instead of abar_prev fails against the package's loop."""
    def ddim_step(z_t, eps_pred, a, a_prev, eta, noise):
        x0 = (z_t - math.sqrt(1 - a) * eps_pred) / math.sqrt(a)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps_pred

    r = _run("02", ddim_step=ddim_step)["ddim_step"]
    assert r.status == "fail" and "step 0 of sample_ddim" in r.message


def test_guidance_reversed_fails():
    """Guidance that starts from the conditional prediction fails already at scale 1."""
    r = _run("02", guidance=lambda u, c, s: c + s * (u - c))["guidance"]
    assert r.status == "fail" and "guidance_scale=1.0" in r.message and "max abs diff" in r.message


def test_attention_without_scale_fails():
    """Attention without the 1/sqrt(hd) scale fails on the weights."""
    def attention(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return w @ v, w

    r = _run("03", attention=attention)["attention"]
    assert r.status == "fail" and "weights: values differ" in r.message


def test_attention_softmax_over_wrong_axis_fails():
    """A softmax over the queries instead of the keys fails."""
    def attention(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-2)
        return w @ v, w

    assert _run("03", attention=attention)["attention"].status == "fail"


def test_cross_attention_heads_mixed_up_fails():
    """Splitting channels into heads in the wrong order fails against the package's module."""
    def cross_attention(module, x, context):
        B, N, C = x.shape
        nh, M = module.num_heads, context.shape[1]
        q = module.to_q(x).view(B, N, C // nh, nh).permute(0, 3, 1, 2)
        k = module.to_k(context).view(B, M, C // nh, nh).permute(0, 3, 1, 2)
        v = module.to_v(context).view(B, M, C // nh, nh).permute(0, 3, 1, 2)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // nh), -1) @ v
        return module.to_out(out.transpose(1, 2).reshape(B, N, C))

    r = _run("03", cross_attention=cross_attention)["cross_attention"]
    assert r.status == "fail" and "max abs diff" in r.message


# ----------------------------------------------------------------------------------------------
# Answers written from the docstrings alone (no minildm calls), right and with one typical mistake
# ----------------------------------------------------------------------------------------------

def _ddim_sample(eps_fn, z, abar, timesteps, eta, generator, add_noise=True, last=0):
    for i, t in enumerate(timesteps):
        a = float(abar[t])
        a_prev = float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else (float(abar[0]) if last == 0 else 1.0)
        eps = eps_fn(z, torch.full((z.shape[0],), float(t)))
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0:
            noise = torch.randn(z.shape, generator=generator)
            z = z + sigma * noise if add_noise else z
    return z


def test_a_hand_written_ddim_loop_passes_and_one_without_eta_noise_fails():
    """A DDIM loop written from the docstring passes; one that draws eta's noise but never adds it fails at
    eta > 0, naming the call; one that ends at abar = 1 instead of abar_0 fails too."""
    assert _run("02", ddim_sample=_ddim_sample)["ddim_sample"].status == "pass"
    r = _run("02", ddim_sample=lambda *a: _ddim_sample(*a, add_noise=False))["ddim_sample"]
    assert r.status == "fail" and "eta=0.5" in r.message and "sample_ddim" in r.message
    assert "max abs diff" in r.message
    r = _run("02", ddim_sample=lambda *a: _ddim_sample(*a, last=1))["ddim_sample"]
    assert r.status == "fail" and "eta=0.0" in r.message


def _cfg_denoiser(model, context, uncond_context, scale, swapped=False, two_calls=False):
    def eps_fn(z_t, t):
        uncond = uncond_context.expand_as(context)
        if two_calls:
            eps_uncond, eps_cond = model(z_t, t, uncond), model(z_t, t, context)
        else:
            eps_uncond, eps_cond = model(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                         torch.cat([uncond, context])).chunk(2)
        if swapped:
            eps_uncond, eps_cond = eps_cond, eps_uncond
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return eps_fn


def test_cfg_denoiser_right_swapped_and_in_two_calls():
    """A batched guided denoiser passes; with the two predictions' roles swapped it fails on the values;
    with two model calls instead of one it fails and says so."""
    assert _run("02", cfg_denoiser=_cfg_denoiser)["cfg_denoiser"].status == "pass"
    r = _run("02", cfg_denoiser=lambda *a: _cfg_denoiser(*a, swapped=True))["cfg_denoiser"]
    assert r.status == "fail" and "guidance_scale=7.5" in r.message and "max abs diff" in r.message
    r = _run("02", cfg_denoiser=lambda *a: _cfg_denoiser(*a, two_calls=True))["cfg_denoiser"]
    assert r.status == "fail" and "one call on a batch of 6" in r.message


def _timestep_embedding(t, dim, sines_first=False):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]
    parts = [torch.sin(args), torch.cos(args)] if sines_first else [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts, dim=-1)
    return torch.cat([emb, torch.zeros(len(t), dim % 2)], dim=-1)


def test_timestep_embedding_with_sines_first_fails():
    """The embedding written from the docstring passes; with sines and cosines swapped it fails, at dim 320."""
    assert _run("03", timestep_embedding=_timestep_embedding)["timestep_embedding"].status == "pass"
    r = _run("03", timestep_embedding=lambda t, d: _timestep_embedding(t, d, True))["timestep_embedding"]
    assert r.status == "fail" and "dim=320" in r.message and "max abs diff" in r.message


def _res_block(block, x, emb, time_after_second_conv=False):
    h = block.in_layers(x)
    shift = block.emb_layers(emb)[:, :, None, None]
    if time_after_second_conv:
        h = block.out_layers(h) + shift
    else:
        h = block.out_layers(h + shift)
    return block.skip_connection(x) + h


def test_res_block_with_time_after_the_second_conv_fails():
    """A ResBlock with the time shift between the convolutions passes; one that adds it after the second
    convolution fails (the check draws the zero-initialised convolution at random, so it shows)."""
    assert _run("03", res_block=_res_block)["res_block"].status == "pass"
    r = _run("03", res_block=lambda b, x, e: _res_block(b, x, e, True))["res_block"]
    assert r.status == "fail" and "res_block(ResBlock(channels=8" in r.message and "max abs diff" in r.message


def _multi_head_attention(x, context, w_q, w_k, w_v, w_out, b_out, num_heads, split=True):
    B, N, C = x.shape
    M = context.shape[1]
    nh = num_heads if split else 1
    q = (x @ w_q.T).view(B, N, nh, C // nh).transpose(1, 2)
    k = (context @ w_k.T).view(B, M, nh, C // nh).transpose(1, 2)
    v = (context @ w_v.T).view(B, M, nh, C // nh).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // num_heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return out @ w_out.T + b_out, weights


def test_attention_without_heads_fails():
    """Multi-head attention from the weights passes; one softmax over all C channels (no heads) fails."""
    assert _run("03", multi_head_attention=_multi_head_attention)["multi_head_attention"].status == "pass"
    r = _run("03", multi_head_attention=lambda *a: _multi_head_attention(*a, split=False))["multi_head_attention"]
    assert r.status == "fail" and "num_heads=4" in r.message and "output: values differ" in r.message


def _img2img_start(z0, noise, abar, timesteps, strength, off_by_one=False):
    n = len(timesteps)
    first = n - int(n * strength) - (1 if off_by_one else 0)
    first = max(first, 0)
    a = float(abar[timesteps[first]])
    return first, math.sqrt(a) * z0 + math.sqrt(1 - a) * noise


def test_img2img_start_off_by_one_step_fails():
    """img2img's start written from the docstring passes; starting one step earlier fails and names the
    step generate starts at."""
    assert _run("07", img2img_start=_img2img_start)["img2img_start"].status == "pass"
    r = _run("07", img2img_start=lambda *a: _img2img_start(*a, off_by_one=True))["img2img_start"]
    assert r.status == "fail" and "first_step is 1" in r.message and "at step 2" in r.message


def _inpaint_eps(eps_fn, z_t, t, z0, noise, mask, abar, inverted=False):
    m = 1 - mask if inverted else mask
    a = abar[t.long()].view(-1, 1, 1, 1)
    kept = a.sqrt() * z0 + (1 - a).sqrt() * noise
    eps = eps_fn(m * z_t + (1 - m) * kept, t)
    return m * eps + (1 - m) * (z_t - a.sqrt() * z0) / (1 - a).sqrt()


def test_inpainting_with_the_mask_inverted_fails():
    """The inpainting blend passes; with the mask inverted (keeping what should be repainted) it fails."""
    assert _run("07", inpaint_eps=_inpaint_eps)["inpaint_eps"].status == "pass"
    r = _run("07", inpaint_eps=lambda *a: _inpaint_eps(*a, inverted=True))["inpaint_eps"]
    assert r.status == "fail" and "inpaint_eps(eps_fn" in r.message and "t=981" in r.message


def _lora_merge(weight, down, up, alpha, scale, with_alpha=True):
    rank = down.shape[0]
    factor = scale * ((rank if alpha is None else alpha) / rank if with_alpha else 1.0)
    return weight + factor * (up.flatten(1) @ down.flatten(1)).view(weight.shape)


def test_lora_merge_without_alpha_over_r_fails():
    """A LoRA merge written from the docstring passes (linear, 1x1 and 3x3); one without alpha / r fails."""
    assert _run("07", lora_merge=_lora_merge)["lora_merge"].status == "pass"
    r = _run("07", lora_merge=lambda *a: _lora_merge(*a, with_alpha=False))["lora_merge"]
    assert r.status == "fail" and "lora_merge(weight (12, 10)" in r.message and "alpha=2.0" in r.message


def test_lora_merge_in_place_fails():
    """A merge that adds into the weight it was given is caught."""
    def lora_merge(weight, down, up, alpha, scale):
        return weight.add_(_lora_merge(weight, down, up, alpha, scale) - weight)

    r = _run("07", lora_merge=lora_merge)["lora_merge"]
    assert r.status == "fail" and "in place" in r.message


def test_bpe_highest_rank_first_fails():
    """A merge loop that takes the highest rank first fails and names the word."""
    ref = check.reference_04()

    def bpe(symbols, ranks):
        symbols = tuple(symbols)
        while len(symbols) > 1:
            pairs = [p for p in zip(symbols[:-1], symbols[1:]) if p in ranks]
            if not pairs:
                break
            symbols = ref.merge_pair(symbols, max(pairs, key=ranks.get))
        return symbols

    r = _run("04", bpe=bpe)["bpe"]
    assert r.status == "fail" and "LOWEST rank" in r.message


def test_merge_pair_overlapping_fails():
    """merge_pair that does not skip past a merged pair (so it merges overlaps twice) fails."""
    def merge_pair(symbols, pair):
        out = []
        for i, s in enumerate(symbols):
            if i + 1 < len(symbols) and (s, symbols[i + 1]) == tuple(pair):
                out.append(s + symbols[i + 1])
            elif not (i > 0 and (symbols[i - 1], s) == tuple(pair)):
                out.append(s)
        return tuple(out)

    r = _run("04", merge_pair=merge_pair)["merge_pair"]
    assert r.status == "fail" and "expected ('aa', 'a', 'a</w>')" in r.message


def test_reparameterize_with_variance_fails():
    """Scaling the noise by the variance instead of the standard deviation fails."""
    r = _run("05", reparameterize=lambda m, lv, n: m + lv.clamp(-30, 20).exp() * n)["reparameterize"]
    assert r.status == "fail" and "reparameterize(" in r.message


def test_reparameterize_without_gradient_fails():
    """A sample detached from the graph fails: gradients must reach mean and logvar."""
    def reparameterize(mean, logvar, noise):
        return (mean + (0.5 * logvar.clamp(-30, 20)).exp() * noise).detach()

    r = _run("05", reparameterize=reparameterize)["reparameterize"]
    assert r.status == "fail" and "no gradient" in r.message


def test_kl_with_wrong_sign_fails():
    """The KL with its sign flipped fails."""
    def gaussian_kl(mean, logvar):
        lv = logvar.clamp(-30, 20)
        return -0.5 * (mean**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))

    r = _run("05", gaussian_kl=gaussian_kl)["gaussian_kl"]
    assert r.status == "fail" and "gaussian_kl(" in r.message and "max abs diff" in r.message


def test_training_loss_against_x0_fails():
    """A loss that regresses the clean latent instead of the noise fails."""
    def training_loss(model, schedule, z0, context, t, noise):
        z_t = schedule.q_sample(z0, t, noise)
        return torch.nn.functional.mse_loss(model(z_t, t, context), z0)

    r = _run("06", training_loss=training_loss)["training_loss"]
    assert r.status == "fail" and "training_loss(" in r.message


def test_ema_without_warm_up_fails():
    """An EMA that ignores the original's decay warm-up fails at the first update."""
    def ema_update(shadow, weights, decay, num_updates):
        return {k: decay * shadow[k] + (1 - decay) * weights[k] for k in shadow}

    r = _run("06", ema_update=ema_update)["ema_update"]
    assert r.status == "fail" and "num_updates=1" in r.message


def test_ema_key_keeping_dots_fails():
    """An EMA key that keeps its dots fails and shows the expected key."""
    r = _run("07", ema_key=lambda k: "model_ema.diffusion_model." + k)["ema_key"]
    assert r.status == "fail" and "expected 'model_ema.diffusion_modeltime_embed0weight'" in r.message


def test_unet_weights_ignoring_ema_fails():
    """Returning the non-EMA weights when EMA ones exist and are asked for fails."""
    def unet_weights(state, use_ema):
        prefix = "model.diffusion_model."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    r = _run("07", unet_weights=unet_weights)["unet_weights"]
    assert r.status == "fail" and "non-EMA weight" in r.message


def test_lerp_is_not_slerp():
    """Straight-line interpolation fails the slerp check."""
    r = _run("08", slerp=lambda a, b, t: (1 - t) * a + t * b)["slerp"]
    assert r.status == "fail"


def test_lcm_exercises_catch_the_usual_mistakes():
    """Chapter 10: a grid spread over the wrong count, a boundary condition without the timestep scaling,
    and a loop that re-noises along its own prediction (DDIM's way) instead of fresh noise, each fail."""
    import torch

    from minildm.samplers import lcm_boundary_scalings, lcm_timesteps
    from minildm.schedule import NoiseSchedule

    ref = check.CHAPTERS["10"].reference()
    r = _run("10", lcm_timesteps=lambda n: [999 - i * (1000 // n) for i in range(n)])["lcm_timesteps"]
    assert r.status == "fail" and "lcm_timesteps(3)" in r.message
    unscaled = lambda t: (0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5)
    assert _run("10", boundary_scalings=unscaled)["boundary_scalings"].status == "fail"

    def ddim_like(eps_fn, z, abar, timesteps, noises):
        for i, t in enumerate(timesteps):
            eps = eps_fn(z, torch.full((z.shape[0],), float(t)))
            c_skip, c_out = lcm_boundary_scalings(t)
            x0 = c_out * (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt() + c_skip * z
            if i == len(timesteps) - 1:
                return x0
            z = abar[timesteps[i + 1]].sqrt() * x0 + (1 - abar[timesteps[i + 1]]).sqrt() * eps
    assert _run("10", lcm_sample=ddim_like)["lcm_sample"].status == "fail"
    assert ref.lcm_timesteps(4) == lcm_timesteps(NoiseSchedule.sd(), 4).tolist() == [999, 759, 499, 259]


def test_fine_tuning_exercises_catch_the_usual_mistakes():
    """Chapter 11: a LoRA count that forgets a convolution's kernel, a new word read from a detached copy (no
    gradient reaches it), and grey photos truncated instead of rounded, each fail."""
    kernel_forgotten = lambda shapes, rank: sum(rank * (s[0] + s[1]) for s in shapes)
    r = _run("11", lora_numbers=kernel_forgotten)["lora_numbers"]
    assert r.status == "fail" and "4-dimensional" in r.message

    def detached(table, tokens, first, vectors):
        return torch.cat([table[:first], vectors.detach()])[tokens]
    r = _run("11", new_word_rows=detached)["new_word_rows"]
    assert r.status == "fail" and "no gradient" in r.message
    truncated = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).to(torch.uint8)[:, None].expand(
        -1, 3, -1, -1)
    assert _run("11", black_and_white=truncated)["black_and_white"].status == "fail"


def test_images_as_prompts_exercises_catch_the_usual_mistakes():
    """Chapter 12: patches flattened channel-last, scores of raw (not unit) embeddings, a mix of raw image
    embeddings, one softmax over text and image tokens together, and photos paired with themselves, each fail."""
    import torch.nn.functional as F

    def channel_last(pixels, P):
        B, C, H, W = pixels.shape
        x = pixels.unfold(2, P, P).unfold(3, P, P)                          # (B, C, H/P, W/P, P, P)
        return x.permute(0, 2, 3, 4, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)
    r = _run("12", patchify=channel_last)["patchify"]
    assert r.status == "fail" and "channel, then row, then column" in r.message
    raw = lambda image, text, scale: scale.exp() * image @ text.T
    assert _run("12", clip_scores=raw)["clip_scores"].status == "fail"

    def raw_mix(image_embeds, image_weights, plus_embeds, minus_embeds, a, norm=None):
        w = torch.tensor(image_weights)
        e = (w[:, None] * image_embeds).sum(0) + a * plus_embeds.sum(0) - a * minus_embeds.sum(0)
        return e
    assert _run("12", joint_mix=raw_mix)["joint_mix"].status == "fail"

    def one_softmax(q, kt, vt, ki, vi, scale):
        return F.scaled_dot_product_attention(q, torch.cat([kt, ki], 2), torch.cat([vt, scale * vi], 2))
    assert _run("12", decoupled_attention=one_softmax)["decoupled_attention"].status == "fail"
    r = _run("12", class_pairs=lambda labels, generator: torch.arange(len(labels)))["class_pairs"]
    assert r.status == "fail" and "paired with itself" in r.message
    fixed = lambda labels, generator: torch.tensor([1, 0, 0, 4, 3, 5, 7, 6, 6, 6])
    r = _run("12", class_pairs=fixed)["class_pairs"]
    assert r.status == "fail" and "same pairs for every generator" in r.message


def test_break_it_wrong_and_missing_answers():
    """A wrong prediction fails without revealing the answer; a missing one is TODO."""
    results = _run("09", SNR_RATIO_UNSCALED=1 / 0.18215, EMA_INIT_SHARE=None, NO_GUIDANCE_CHOICE="a")
    assert results["wrong latent scale"].status == "fail"
    assert "not within 1%" in results["wrong latent scale"].message
    assert str(round((1 / 0.18215) ** 2, 2)) not in results["wrong latent scale"].message
    assert results["no EMA"].status == "todo"
    assert results["no guidance"].status == "fail"


def test_crash_in_learner_code_is_reported_with_its_line():
    """An exception in the learner's function is an ERROR naming the exception, not a traceback."""
    def q_sample(schedule, x0, t, noise):
        return x0 + noise[:2]

    r = _run("01", q_sample=q_sample)["q_sample"]
    assert r.status == "error" and "RuntimeError" in r.message and "test_check.py" in r.message


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "minildm.check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_on_a_stub_reports_not_implemented():
    """The CLI on an untouched stub says "not implemented", exits 1, and prints no traceback."""
    proc = _cli("01", "--impl", "lessons/exercises/ex01_forward_diffusion.py")
    assert proc.returncode == 1
    assert "TODO" in proc.stdout and "not implemented" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_passes_a_correct_file_and_fails_a_wrong_one(tmp_path):
    """A correct answer file exits 0 with PASS lines; a wrong one exits 1 with the difference."""
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent("""
        def ema_key(unet_key):
            return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")

        def unet_weights(state, use_ema):
            p = "model.diffusion_model."
            unet = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
            has_ema = any(k.startswith("model_ema.") and k not in
                          ("model_ema.decay", "model_ema.num_updates") for k in state)
            if use_ema and has_ema:
                return {k: state[ema_key(k)] for k in unet}
            return unet

        def lora_merge(weight, down, up, alpha, scale):
            rank = down.shape[0]
            alpha = rank if alpha is None else alpha
            return weight + scale * alpha / rank * (up.flatten(1) @ down.flatten(1)).view(weight.shape)

        def img2img_start(z0, noise, alphas_cumprod, timesteps, strength):
            first_step = len(timesteps) - int(len(timesteps) * strength)
            a = alphas_cumprod[timesteps[first_step]]
            return first_step, a.sqrt() * z0 + (1 - a).sqrt() * noise

        def inpaint_eps(eps_fn, z_t, t, z0, noise, mask, alphas_cumprod):
            a = alphas_cumprod[t.long()].view(-1, 1, 1, 1)
            eps = eps_fn(mask * z_t + (1 - mask) * (a.sqrt() * z0 + (1 - a).sqrt() * noise), t)
            return mask * eps + (1 - mask) * (z_t - a.sqrt() * z0) / (1 - a).sqrt()
    """))
    proc = _cli("07", "--impl", str(good))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 5

    bad = tmp_path / "bad.py"
    bad.write_text(good.read_text().replace('.replace(".", "")', ""))
    proc = _cli("07", "--impl", str(bad))
    assert proc.returncode == 1 and "FAIL" in proc.stdout and "expected 'model_ema." in proc.stdout


def test_cli_list_and_unknown_chapter():
    """--list names every exercise file; an unknown chapter is a one-line error with exit 2."""
    proc = _cli("--list")
    assert proc.returncode == 0
    for c in check.CHAPTERS.values():
        assert c.path.name in proc.stdout
    proc = _cli("42")
    assert proc.returncode == 2 and "no exercises for chapter 42" in proc.stderr


def test_exercise_files_exist_for_every_chapter():
    """Each chapter's exercise file exists and defines every function the checks call."""
    for c in check.CHAPTERS.values():
        assert c.path.exists(), c.path
        impl = check.load_impl(c.path)
        ref = c.reference()
        missing = [name for name in vars(ref) if not hasattr(impl, name)]
        assert not missing, f"{c.path.name} lacks {missing}"


def test_course_map_links_every_chapter():
    """lessons/README.md links each chapter's lesson, notebook and exercise check, and they exist."""
    course = (ROOT / "lessons" / "README.md").read_text()
    lessons = sorted(p.name for p in (ROOT / "lessons").glob("[0-9][0-9]_*.md"))
    for name in lessons:
        stem = name[:-3]
        assert f"]({name})" in course, f"lessons/README.md does not link {name}"
        assert f"../notebooks/{stem}.ipynb" in course, f"lessons/README.md does not link {stem}.ipynb"
        assert (ROOT / "notebooks" / f"{stem}.ipynb").exists(), f"notebooks/{stem}.ipynb is missing"
    for c in check.CHAPTERS.values():
        assert f"{c.stem}.md" in lessons, f"exercises for {c.stem} but no lesson"
        assert f"check {c.number}" in course, f"lessons/README.md does not show `check {c.number}`"
