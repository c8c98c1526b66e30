"""Tests for minildm.vae: parity with diffusers through the original key layout, shapes, losses."""
from __future__ import annotations

import pytest
import torch

from minildm.convert import VAE_PREFIX, add_prefix
from minildm.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, estimate_scale_factor
from minildm.vae_loss import PatchDiscriminator, VAELoss, adaptive_weight, hinge_d_loss


def _diffusers_config(cfg: VAEConfig) -> dict:
    """The diffusers AutoencoderKL config equivalent to a minildm VAEConfig."""
    n = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups, scaling_factor=cfg.scale_factor,
    )


def _to_diffusers(state_dict: dict, cfg: VAEConfig) -> dict:
    """Our state dict -> original checkpoint layout -> diffusers, with diffusers' own converter."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    checkpoint = add_prefix(state_dict, VAE_PREFIX)
    return single_file_utils.convert_ldm_vae_checkpoint(checkpoint, _diffusers_config(cfg))


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


def test_parity_with_diffusers_encoder_and_decoder():
    """Posterior mean/logvar and decoder output match diffusers' AutoencoderKL to 1e-5 in float32."""
    diffusers = pytest.importorskip("diffusers")
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, z_channels=4,
                    norm_groups=8)
    ours = AutoencoderKL(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            scale = 0.05 if p.ndim > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ref = diffusers.AutoencoderKL(**_diffusers_config(cfg)).eval()
    ref.load_state_dict(_to_diffusers(ours.state_dict(), cfg), strict=True)

    x = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    z = torch.randn(2, 4, 6, 5, generator=g)
    with torch.no_grad():
        posterior = ours.encode(x)
        ref_posterior = ref.encode(x).latent_dist
        x_rec, ref_rec = ours.decode(z), ref.decode(z).sample
    assert torch.allclose(posterior.mean, ref_posterior.mean, rtol=0, atol=1e-5), \
        "posterior mean: " + _diff(posterior.mean, ref_posterior.mean)
    assert torch.allclose(posterior.logvar, ref_posterior.logvar, rtol=0, atol=1e-5), \
        "posterior logvar: " + _diff(posterior.logvar, ref_posterior.logvar)
    assert torch.allclose(x_rec, ref_rec, rtol=0, atol=1e-5), "decoder output: " + _diff(x_rec, ref_rec)
    # The values are far from trivial: a test of zeros against zeros would prove nothing.
    assert posterior.mean.std() > 0.1 and x_rec.std() > 0.1


def test_sd_preset_has_the_checkpoint_keys_and_shapes():
    """sd() on the meta device has exactly the keys and shapes of SD v1's first_stage_model."""
    diffusers = pytest.importorskip("diffusers")
    cfg = VAEConfig.sd()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(**_diffusers_config(cfg))
    ours_sd = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    # The original stores attention weights as 1x1 convolutions; the decoder's up.0 is 128 channels.
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ours_sd["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert ours_sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert ours_sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ours_sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ours_sd
    assert ours_sd["encoder.down.3.block.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in ours_sd

    # Every key of ours maps to a distinct diffusers key, and together they are all of diffusers' keys
    # with the shapes diffusers expects (diffusers squeezes the 1x1 attention convs to linears).
    converted = _to_diffusers(ours_sd, cfg)
    ref_sd = ref.state_dict()
    assert len(converted) == len(ours_sd), "some keys were dropped or merged by the converter"
    assert set(converted) == set(ref_sd), (
        f"missing {sorted(set(ref_sd) - set(converted))[:5]}, "
        f"unexpected {sorted(set(converted) - set(ref_sd))[:5]}")
    bad = {k: (tuple(v.shape), tuple(ref_sd[k].shape)) for k, v in converted.items()
           if v.shape != ref_sd[k].shape}
    assert not bad, f"shape mismatches: {dict(list(bad.items())[:5])}"


def test_shapes_odd_sizes_and_batch_one():
    """Odd image sizes floor at each halving, and batch 1 works for encode, decode and forward."""
    cfg = VAEConfig.tiny()  # f = 2
    vae = AutoencoderKL(cfg)
    x = torch.rand(1, 3, 17, 23) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (1, cfg.z_channels, 8, 11)
    assert vae.decode(posterior.mode()).shape == (1, 3, 16, 22)
    x_rec, _ = vae(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert x_rec.shape == (1, 3, 16, 16)
    cfg3 = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    assert cfg3.downsample_factor == 4 and cfg3.compression_ratio() == 12.0
    assert AutoencoderKL(cfg3).encode(torch.zeros(1, 3, 15, 9)).mean.shape == (1, 4, 3, 2)


def test_sample_and_mode():
    """mode() is the mean; sample() is reproducible with a generator and has the posterior's spread."""
    mean = torch.randn(2, 4, 8, 8)
    logvar = torch.full((2, 4, 8, 8), 2 * torch.log(torch.tensor(0.5)).item())
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean)
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    c = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs((a - mean).std().item() - 0.5) < 0.05
    vae = AutoencoderKL(VAEConfig.tiny())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    r1, _ = vae(x, generator=torch.Generator().manual_seed(0))
    r2, _ = vae(x, generator=torch.Generator().manual_seed(0))
    r3, _ = vae(x, sample_posterior=False)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_kl_of_the_prior_is_zero_and_logvar_is_clamped():
    """KL(N(0, I) || N(0, I)) = 0; it grows with the mean; logvar is clamped to [-30, 20]."""
    prior = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    assert torch.equal(prior.kl(), torch.zeros(3))
    shifted = DiagonalGaussian(torch.cat([torch.ones(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)], dim=1))
    assert torch.allclose(shifted.kl(), torch.tensor([0.5 * 64]))  # 0.5 * mean^2 per element
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], 1))
    assert extreme.logvar.flatten().tolist() == [-30.0, 20.0]


def test_moments_are_not_mutated():
    """Building a posterior leaves the caller's tensor untouched."""
    moments = torch.randn(1, 8, 2, 2) * 50
    before = moments.clone()
    DiagonalGaussian(moments).sample()
    assert torch.equal(moments, before)


def _tiny_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour blobs in [-1, 1]: structured enough to be compressible."""
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _train_tiny(loss_fn: VAELoss, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(VAEConfig.tiny())
    data = _tiny_images(64, 16, g)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)

    def mse():
        with torch.no_grad():
            return (vae.decode(vae.encode(data).mode()) - data).pow(2).mean().item()

    before = mse()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        x_rec, posterior = vae(x, generator=g)
        loss, _ = loss_fn(x, x_rec, posterior, step, last_layer=vae.decoder.conv_out.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, mse()


def test_training_reduces_reconstruction_error():
    """A few hundred steps of the tiny VAE on a tiny set cut the reconstruction error several-fold."""
    torch.set_num_threads(1)
    before, after = _train_tiny(VAELoss(kl_weight=1e-6, rec_loss="l2"), steps=200)
    assert after < 0.3 * before, f"MSE {before:.4f} -> {after:.4f}"


class _BrokenLoss(VAELoss):
    """A loss that ignores the reconstruction: what the training test must catch."""

    def reconstruction(self, x, x_rec):
        return (x_rec - x_rec.detach()).sum() * 0 + x.sum() * 0


def test_training_test_catches_a_broken_loss():
    """The same training with a loss that ignores the reconstruction does not reduce the error."""
    torch.set_num_threads(1)
    before, after = _train_tiny(_BrokenLoss(kl_weight=1e-6, rec_loss="l2"), steps=200)
    assert not after < 0.3 * before, f"MSE {before:.4f} -> {after:.4f}"


def test_loss_normalisation_and_weights():
    """Reconstruction and KL are per-sample sums averaged over the batch; kl_weight scales the KL."""
    x = torch.zeros(2, 3, 4, 4)
    x_rec = torch.full((2, 3, 4, 4), 0.5)
    posterior = DiagonalGaussian(torch.cat([torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)], dim=1))
    loss, logs = VAELoss(kl_weight=0.1, rec_loss="l1")(x, x_rec, posterior, step=0)
    assert logs["rec"] == pytest.approx(0.5 * 48) and logs["kl"] == pytest.approx(0.5 * 16)
    assert loss.item() == pytest.approx(24 + 0.1 * 8)
    loss2, _ = VAELoss(kl_weight=0.0, rec_loss="l2")(x, x_rec, posterior, step=0)
    assert loss2.item() == pytest.approx(0.25 * 48)
    with pytest.raises(ValueError):
        VAELoss(rec_loss="l3")


def test_adaptive_weight_balances_the_gradients():
    """The adaptive weight is ||grad rec|| / ||grad gan|| at the last layer, scaled, clamped to 1e4."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3.0 * w).sum()          # gradient (3, 3): norm 3*sqrt(2)
    g = (w * torch.tensor([0.0, 1.5])).sum()   # gradient (0, 1.5): norm 1.5
    weight = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 3 * 2 ** 0.5 / (1.5 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # Doubling the adversarial loss halves its weight: the weighted gradient keeps its size.
    assert adaptive_weight(rec, 2 * g, w).item() == pytest.approx(adaptive_weight(rec, g, w).item() / 2, rel=1e-3)
    # A vanishing adversarial gradient gives the clamp, not infinity.
    assert adaptive_weight(rec, (w * 0).sum() + 0 * w.sum(), w).item() == pytest.approx(1e4)


def test_discriminator_switches_on_at_disc_start():
    """Before disc_start the GAN terms are absent; after, the loss uses them and trains D and G."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny())
    disc = PatchDiscriminator(in_channels=3, ndf=8, n_layers=2)
    loss_fn = VAELoss(kl_weight=1e-6, discriminator=disc, disc_start=10, disc_weight=0.5)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x_rec, posterior = vae(x)
    last = vae.decoder.conv_out.weight
    loss_early, logs_early = loss_fn(x, x_rec, posterior, step=9, last_layer=last)
    assert "g" not in logs_early
    d_early, d_logs_early = loss_fn.discriminator_loss(x, x_rec.detach(), step=9)
    assert d_early.item() == 0.0 and d_logs_early == {}
    d_early.backward()  # a no-op the training loop can run unconditionally
    assert all(p.grad is None for p in disc.parameters())

    loss_late, logs_late = loss_fn(x, x_rec, posterior, step=10, last_layer=last)
    assert logs_late["d_weight"] > 0
    assert loss_late.item() == pytest.approx(
        logs_late["rec"] + 1e-6 * logs_late["kl"] + logs_late["d_weight"] * logs_late["g"], rel=1e-5)
    d_late, d_logs = loss_fn.discriminator_loss(x, x_rec.detach(), step=10)
    d_late.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert vae.decoder.conv_out.weight.grad is None  # x_rec was detached: D's loss never reaches G


def test_hinge_loss_signs():
    """The hinge loss is zero for confident correct logits and grows for wrong ones."""
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.full((4,), -1.0), torch.full((4,), 1.0)).item() == pytest.approx(2.0)
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    # The generator's term -mean(D(x_rec)) falls as D is fooled into larger logits.
    disc = PatchDiscriminator(ndf=8, n_layers=2)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(ndf=8, n_layers=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_estimate_scale_factor_normalises_latents():
    """Latents multiplied by estimate_scale_factor have unit standard deviation."""
    vae = AutoencoderKL(VAEConfig.tiny())
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    scale = estimate_scale_factor(vae, batches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = torch.cat([vae.encode(x).sample(torch.Generator().manual_seed(1)) for x in batches])
    assert (z * scale).std().item() == pytest.approx(1.0, rel=0.05)


def test_config_round_trip():
    """to_dict is JSON-serialisable and from_dict rebuilds an equal config."""
    import json

    for cfg in (VAEConfig.sd(), VAEConfig.cifar(), VAEConfig.tiny()):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert VAEConfig.from_dict(d) == cfg
        assert isinstance(d["channel_mult"], list)
    assert VAEConfig.sd().downsample_factor == 8 and VAEConfig.sd().compression_ratio() == 48.0
    assert VAEConfig.cifar().compression_ratio() == 6.0
