"""Tests for minildm.taesd: parity with diffusers' AutoencoderTiny, the original files' key layout, loading."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from minildm.convert import CheckpointError
from minildm.taesd import TAESDConfig, TinyAutoencoder, load_taesd

diffusers = pytest.importorskip("diffusers")

C = 8  # the width of the test models: the SD layer list, 64 channels narrowed to 8


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max abs diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=0, atol=1e-5), f"{what}: {_diff(a, b)}"


def _random_diffusers(channels: int = C, latent_channels: int = 4):
    """A diffusers AutoencoderTiny with random weights large enough that every layer matters."""
    model = diffusers.AutoencoderTiny(encoder_block_out_channels=(channels,) * 4,
                                      decoder_block_out_channels=(channels,) * 4,
                                      latent_channels=latent_channels).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            scale = 1.2 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _inputs():
    """Images (one with sizes that are not multiples of 8) and latents of an odd size, 5x7."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 56, generator=g) * 2 - 1
    x_odd = torch.rand(1, 3, 37, 50, generator=g) * 2 - 1
    z = torch.randn(2, 4, 5, 7, generator=g) * 2  # beyond +-3 often, so the soft clamp matters
    return x, x_odd, z


def _check_against(ours: TinyAutoencoder, ref, encoder: bool = True) -> None:
    x, x_odd, z = _inputs()
    with torch.no_grad():
        if encoder:
            for image in (x, x_odd):
                z_ours, z_ref = ours.encode(image), ref.encode(image).latents
                _close(z_ours, z_ref, f"encode {tuple(image.shape)}")
            assert z_ours.std() > 0.1
        x_ours, x_ref = ours.decode(z), ref.decode(z).sample
    _close(x_ours, x_ref, "decode (2, 4, 5, 7)")
    assert x_ours.shape == (2, 3, 40, 56) and x_ours.std() > 0.1


# ----------------------------------------------------------------------------------------------
# The original networks, written here from torch.nn alone as the TAESD repository lists them: two bare
# nn.Sequential, so that their state dicts have the keys of taesd_encoder.pth and taesd_decoder.pth.


class _RefBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, a):
        return self.fuse(self.conv(a) + self.skip(a))


class _RefClamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3


def _ref_encoder(c, zc=4):
    def down():
        return nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
    B = _RefBlock
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), B(c),
                         down(), B(c), B(c), B(c),
                         down(), B(c), B(c), B(c),
                         down(), B(c), B(c), B(c),
                         nn.Conv2d(c, zc, 3, padding=1))


def _ref_decoder(c, zc=4):
    def up():
        return [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1, bias=False)]
    B = _RefBlock
    return nn.Sequential(_RefClamp(), nn.Conv2d(zc, c, 3, padding=1), nn.ReLU(),
                         B(c), B(c), B(c), *up(),
                         B(c), B(c), B(c), *up(),
                         B(c), B(c), B(c), *up(),
                         B(c), nn.Conv2d(c, 3, 3, padding=1))


def _copy_by_position(target: nn.Module, source: nn.Module) -> None:
    """Parameters copied in order, ignoring names: shapes must agree one by one."""
    ts, ss = list(target.parameters()), list(source.parameters())
    assert len(ts) == len(ss)
    with torch.no_grad():
        for i, (t, s) in enumerate(zip(ts, ss)):
            assert t.shape == s.shape, f"parameter {i}: {tuple(t.shape)} vs {tuple(s.shape)}"
            t.copy_(s)


def _original_files(ref):
    """The original-layout networks with diffusers' weights, checked against diffusers by their outputs."""
    encoder, decoder = _ref_encoder(C), _ref_decoder(C)
    _copy_by_position(encoder, ref.encoder)
    _copy_by_position(decoder, ref.decoder)
    x, _, z = _inputs()
    with torch.no_grad():  # the original speaks [0, 1] images
        _close(encoder((x + 1) / 2), ref.encode(x).latents, "reference encoder")
        _close(decoder(z) * 2 - 1, ref.decode(z).sample, "reference decoder")
    return encoder.state_dict(), decoder.state_dict()


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_parity_with_a_diffusers_folder(tmp_path, safe):
    """A saved diffusers AutoencoderTiny (.safetensors or .bin) loads and encodes/decodes as diffusers does."""
    ref = _random_diffusers()
    ref.save_pretrained(tmp_path, safe_serialization=safe)
    ours = load_taesd(tmp_path)
    assert ours.cfg == TAESDConfig.tiny() and not ours.training
    _check_against(ours, ref)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_parity_through_the_original_files(tmp_path, ext):
    """Diffusers' weights put by position into the original's Sequentials (which then match diffusers) and
    saved as taesd_encoder/taesd_decoder files load, and the keys are ours behind encoder./decoder.
    The folder also holds the diffusers files, as madebyollin/taesd on the Hub does."""
    ref = _random_diffusers()
    ref.save_pretrained(tmp_path)
    enc_state, dec_state = _original_files(ref)
    assert "0.weight" in enc_state and "1.conv.0.weight" in enc_state and "14.bias" in enc_state
    assert "0.weight" not in dec_state and "1.weight" in dec_state and "19.bias" in dec_state
    assert not any(".skip." in k for k in enc_state | dec_state)        # equal widths: Identity skips
    ours_keys = set(TinyAutoencoder(TAESDConfig.tiny()).state_dict())
    assert ours_keys == {"encoder." + k for k in enc_state} | {"decoder." + k for k in dec_state}
    for name, state in (("taesd_encoder", enc_state), ("taesd_decoder", dec_state)):
        if ext == ".pth":
            torch.save(state, tmp_path / (name + ext))
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / (name + ext)))
    _check_against(load_taesd(tmp_path, cfg=TAESDConfig.tiny()), ref)


def test_full_size_matches_diffusers_and_the_original_layer_list():
    """At SD size (meta device) the encoder and decoder have diffusers' AutoencoderTiny() parameter counts
    (1,222,532 and 1,222,531, as TAESD's README says) and the original Sequentials' keys and shapes."""
    with torch.device("meta"):
        ours = TinyAutoencoder(TAESDConfig.sd())
        ref = diffusers.AutoencoderTiny()
        originals = {"encoder": _ref_encoder(64), "decoder": _ref_decoder(64)}
    for part, expected in (("encoder", 1_222_532), ("decoder", 1_222_531)):
        count = sum(p.numel() for p in getattr(ours, part).parameters())
        assert count == sum(p.numel() for p in getattr(ref, part).parameters()) == expected, part
        mine = {k: v.shape for k, v in getattr(ours, part).state_dict().items()}
        assert mine == {k: v.shape for k, v in originals[part].state_dict().items()}, part
    assert ours.state_dict()["decoder.1.weight"].shape == (64, 4, 3, 3)


def test_decoder_only_folder(tmp_path):
    """With only taesd_decoder.pth the model decodes as diffusers does, and encode says what is missing."""
    ref = _random_diffusers()
    _, dec_state = _original_files(ref)
    torch.save(dec_state, tmp_path / "taesd_decoder.pth")
    ours = load_taesd(tmp_path, cfg=TAESDConfig.tiny())
    assert ours.encoder is None and all(k.startswith("decoder.") for k in ours.state_dict())
    _check_against(ours, ref, encoder=False)
    with pytest.raises(CheckpointError, match="without taesd_encoder"):
        ours.encode(torch.zeros(1, 3, 16, 16))


def test_latent_sizes_round_up():
    """h = ceil(H / 8), w = ceil(W / 8): each stride-2 conv with padding 1 rounds up; decode gives 8h x 8w."""
    model = TinyAutoencoder(TAESDConfig.tiny())
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 33, 17)).shape == (1, 4, 5, 3)
        assert model.decode(torch.zeros(3, 4, 5, 3)).shape == (3, 3, 40, 24)


def test_dtype_is_applied(tmp_path):
    """The weights come out in the dtype asked for, and so does the image."""
    _random_diffusers().save_pretrained(tmp_path)
    model = load_taesd(tmp_path, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.decode(torch.zeros(1, 4, 2, 2, dtype=torch.float64)).dtype == torch.float64


def test_errors_are_one_line_checkpoint_errors(tmp_path):
    """Missing folder, empty folder, an SD VAE folder, an SDXL TAESD, 16 latent channels, wrong widths,
    another scaling factor, and diffusers' key names in an original file are each refused by name."""
    def refused(path, match, **kw):
        with pytest.raises(CheckpointError, match=match) as info:
            load_taesd(path, **kw)
        assert "\n" not in str(info.value)

    refused(tmp_path / "nowhere", "not found")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "neither taesd_decoder")

    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    refused(tmp_path / "vae", "an SD VAE")

    ref = _random_diffusers()
    enc_state, dec_state = _original_files(ref)
    (tmp_path / "xl").mkdir()
    torch.save(dec_state, tmp_path / "xl" / "taesdxl_decoder.pth")
    refused(tmp_path / "xl", "SDXL")

    (tmp_path / "wide").mkdir()
    torch.save(dec_state, tmp_path / "wide" / "taesd_decoder.pth")
    refused(tmp_path / "wide", "shapes differ", cfg=TAESDConfig(channels=16))
    refused(tmp_path / "wide", "decodes 4 latent channels, not 8", cfg=TAESDConfig(channels=8, latent_channels=8))

    _random_diffusers(latent_channels=16).save_pretrained(tmp_path / "sd3")
    refused(tmp_path / "sd3", "16 latent channels")

    ref.save_pretrained(tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.5}))
    refused(tmp_path / "scaled", "scaling_factor 0.5")

    (tmp_path / "renamed").mkdir()
    torch.save({"layers." + k: v for k, v in ref.decoder.state_dict().items()},
               tmp_path / "renamed" / "taesd_decoder.pth")
    refused(tmp_path / "renamed", "missing .* keys", cfg=TAESDConfig.tiny())
