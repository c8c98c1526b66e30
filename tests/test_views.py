"""The views: their pure helpers, and every view's figure from a tiny random LatentDiffusion."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minildm import views  # noqa: E402
from minildm.clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from minildm.ldm import LatentDiffusion  # noqa: E402
from minildm.tokenizer import CLIPTokenizer  # noqa: E402
from minildm.unet import UNet, UNetConfig  # noqa: E402
from minildm.vae import AutoencoderKL, VAEConfig  # noqa: E402


@pytest.fixture(scope="module")
def ldm():
    torch.manual_seed(0)
    model = LatentDiffusion(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()),
                            CLIPTextModel(CLIPTextConfig.tiny()), CLIPTokenizer.default())
    with torch.no_grad():  # an untrained UNet ends its branches with zeros: predict some noise
        for p in model.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------- pure helpers

def test_slerp_ends_and_keeps_the_norm():
    """slerp starts at a, ends at b, and keeps the norm of two equal-norm tensors (lerp does not)."""
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    b = b * a.norm() / b.norm()
    assert torch.allclose(views.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(views.slerp(a, b, 1.0), b, atol=1e-6)
    mid = views.slerp(a, b, 0.5)
    assert abs(mid.norm() - a.norm()) < 1e-4 * a.norm()
    assert views.lerp(a, b, 0.5).norm() < 0.8 * a.norm()  # two nearly orthogonal noises


def test_slerp_per_token_and_parallel_inputs():
    """With dim=-1 each row is interpolated on its own sphere; parallel inputs fall back to a line."""
    a, b = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    per_row = views.slerp(a, b, 0.3, dim=-1)
    for i in range(5):
        assert torch.allclose(per_row[0, i], views.slerp(a[0, i], b[0, i], 0.3), atol=1e-6)
    assert torch.allclose(views.slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-5)


def test_blend_normalises_weights():
    """blend divides by the sum of the weights and rejects weights that sum to zero."""
    x, y = torch.ones(2), torch.zeros(2)
    assert torch.allclose(views.blend([x, y], [3, 1]), torch.full((2,), 0.75))
    with pytest.raises(ValueError):
        views.blend([x, y], [1, -1])


def test_layer_resolution_and_aggregation():
    """Recorded sums become per-layer maps at each level's resolution and an equal-weight average."""
    assert views.layer_resolution(64, (16, 16)) == (8, 8)
    assert views.layer_resolution(32, (8, 16)) == (4, 8)
    with pytest.raises(ValueError):
        views.layer_resolution(30, (16, 16))
    L = 3
    fine = torch.zeros(16 * 16, L)
    fine[:, 1] = 1.0                    # every position attends to token 1
    coarse = torch.zeros(8 * 8, L)
    coarse[:, 2] = 2.0                  # summed over two calls: token 2 with weight 1
    per_layer, average = views.aggregate_attention({"a": (fine, 1), "b": (coarse, 2)}, (16, 16),
                                                   size=(32, 32))
    assert per_layer["a"].shape == (L, 16, 16) and per_layer["b"].shape == (L, 8, 8)
    assert average.shape == (L, 32, 32)
    assert torch.allclose(average[1], torch.full((32, 32), 0.5))
    assert torch.allclose(average[2], torch.full((32, 32), 0.5))


def test_strip_grid_and_uint8():
    """Images go to uint8 in [0, 255] and line up in strips and grids with white gaps."""
    x = torch.linspace(-1, 1, 3 * 4 * 5).view(1, 3, 4, 5)
    im = views.to_hwc_uint8(x)
    assert im.shape == (1, 4, 5, 3) and im.dtype == np.uint8
    assert im.min() == 0 and im.max() == 255
    strip = views.image_strip([im[0]] * 3, gap=2)
    assert strip.shape == (4, 3 * 5 + 2 * 2, 3)
    grid = views.image_grid([[im[0]] * 2] * 3, gap=1)
    assert grid.shape == (3 * 4 + 2, 2 * 5 + 1, 3)
    assert views.evenly_spaced(10, 4) == [0, 3, 6, 9] and views.evenly_spaced(3, 8) == [0, 1, 2]


# ---------------------------------------------------------------- the views on a tiny model

@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_views_sample_like_generate(ldm, sampler):
    """The views' own loop gives the same image as LatentDiffusion.generate for one seed."""
    context = views.encode(ldm, ["a red circle"])
    noise = views.make_noise(ldm, [3])
    ours = views.generate_from(ldm, context, noise, num_steps=3, guidance_scale=5.0, sampler=sampler, seed=3)
    theirs = ldm.generate("a red circle", num_steps=3, guidance_scale=5.0, sampler=sampler, seed=3)
    diff = (ours.add(1).div(2) - theirs).abs()
    assert diff.max() < 1e-5, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_denoising_filmstrip(ldm, tmp_path):
    """The filmstrip has one frame per step, a 3-row figure, and an animated GIF with every frame."""
    from PIL import Image

    gif = tmp_path / "film.gif"
    strip = views.denoising_filmstrip(ldm, "a red circle", num_steps=4, guidance_scale=3.0,
                                      gif_path=gif, max_columns=3)
    assert strip.steps == [0, 1, 2, 3] and len(strip.noisy) == len(strip.x0_pred) == len(strip.eps_pred) == 4
    assert strip.timesteps == sorted(strip.timesteps, reverse=True)
    assert strip.noisy[0].shape == strip.image.shape == (32, 32, 3)
    assert len(strip.figure.axes) == 3 * 3
    with Image.open(gif) as im:
        assert im.n_frames == 5
    sparse = views.denoising_filmstrip(ldm, "a red circle", num_steps=5, every=2)
    assert sparse.steps == [0, 2, 4]


def test_attention_maps(ldm):
    """Every cross-attention layer is recorded, maps sum to one over tokens, and hooks are removed."""
    maps = views.attention_maps_view(ldm, "a red circle", num_steps=2, guidance_scale=3.0)
    expected = set(ldm.unet.cross_attention_modules())
    assert set(maps.per_layer) == expected
    for m in maps.per_layer.values():
        assert torch.allclose(m.sum(0), torch.ones(m.shape[1:]), atol=1e-4)
    assert maps.average.shape == (77, 32, 32)
    assert [t for _, t in maps.tokens] == ["a", "red", "circle"]
    assert all(m.record is None for m in ldm.unet.modules() if hasattr(m, "record"))
    assert len(maps.figure.axes) >= 4 and len(maps.layer_figure.axes) == len(expected) * 3


def test_attention_maps_for_a_wide_image(ldm):
    """Non-square images give maps of the image's own aspect ratio at every layer."""
    maps = views.attention_maps_view(ldm, "a red circle", num_steps=1, height=32, width=48)
    assert maps.average.shape == (77, 32, 48) and maps.image.shape == (32, 48, 3)
    assert {tuple(m.shape[1:]) for m in maps.per_layer.values()} == {(16, 24), (8, 12)}


def test_recorder_keeps_the_conditional_half():
    """With guidance the batch is [uncond, cond]; the recorder keeps the conditional half only."""
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn2 = torch.nn.Identity()
            self.attn2.record = None

    rec = views.CrossAttentionRecorder(Fake(), num_images=1)
    weights = torch.stack([torch.zeros(2, 4, 3), torch.ones(2, 4, 3)])  # (B=2, nh, N, L)
    rec("attn2", weights)
    total, count = rec.records["attn2"]
    assert count == 1 and torch.equal(total, torch.ones(4, 3))


def test_conditioning_arithmetic(ldm):
    """Interpolation strips start at their first input; blends and arithmetic give one image each."""
    kw = dict(num_steps=2, guidance_scale=3.0)
    first = views.to_hwc_uint8(views.generate_from(ldm, views.encode(ldm, ["a red circle"]),
                                               views.make_noise(ldm, [0]), seed=0, **kw))[0]
    strip = views.prompt_interpolation(ldm, "a red circle", "a blue square", num=3, seed=0, **kw)
    assert strip.images.shape == (3, 32, 32, 3) and len(strip.figure.axes) == 3
    assert np.abs(strip.images[0].astype(int) - first.astype(int)).max() <= 1
    seeds = views.seed_interpolation(ldm, "a red circle", 0, 1, num=3, **kw)
    assert np.abs(seeds.images[0].astype(int) - first.astype(int)).max() <= 1
    blend = views.prompt_blend(ldm, ["a red circle", "a blue square"], [(1, 0), (1, 1), (0, 1)], **kw)
    assert blend.labels == ["1 0", "1 1", "0 1"] and blend.images.shape[0] == 3
    arith = views.context_arithmetic(ldm, "a red circle", "red", "blue", **kw)
    assert arith.labels[-1] == "a - b + c" and arith.images.shape[0] == 4


def test_views_on_a_saved_run(ldm, tmp_path):
    """A checkpoint written as training writes it loads through load_stable_diffusion and feeds a view."""
    from minildm.convert import save_checkpoint
    from minildm.ldm import find_latest_checkpoint, load_stable_diffusion

    save_checkpoint(tmp_path / "runs" / "mine" / "model.safetensors", unet=ldm.unet, vae=ldm.vae,
                    text_encoder=ldm.text_encoder, schedule=ldm.schedule, scale_factor=0.5)
    loaded = load_stable_diffusion(find_latest_checkpoint(tmp_path / "runs")).eval()
    assert loaded.scale_factor == 0.5
    strip = views.seed_interpolation(loaded, "a red circle", 0, 1, num=2, num_steps=2)
    assert strip.images.shape == (2, 32, 32, 3)


def test_sampler_gallery(ldm):
    """Every sampler and step count gets an image and a wall time."""
    gallery = views.sampler_gallery(ldm, "a red circle", samplers=("ddim", "euler", "heun"), steps=(1, 2))
    assert set(gallery.images) == {(s, n) for s in ("ddim", "euler", "heun") for n in (1, 2)}
    assert all(math.isfinite(t) and t > 0 for t in gallery.seconds.values())
    assert len(gallery.figure.axes) == 6


@pytest.mark.parametrize("view,prompts", [("filmstrip", ["a red circle"]), ("attention", ["a red circle"]),
                                          ("interpolate", ["a red circle", "a blue square"]),
                                          ("seeds", ["a red circle"]),
                                          ("arithmetic", ["a red circle", "red", "blue"])])
def test_views_command_line(ldm, tmp_path, view, prompts, capsys):
    """`python -m minildm.views` loads the newest run and writes the view's PNG (and GIF) files."""
    from minildm.convert import save_checkpoint

    save_checkpoint(tmp_path / "runs" / "mine" / "model.safetensors", unet=ldm.unet, vae=ldm.vae,
                    text_encoder=ldm.text_encoder, schedule=ldm.schedule, scale_factor=0.5)
    out = tmp_path / "views"
    assert views.main([view, *prompts, "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
                       "--steps", "2", "--num", "3"]) == 0
    written = capsys.readouterr().out.split()
    assert written and all(os.path.getsize(p) > 0 for p in written)
    assert {os.path.dirname(p) for p in written} == {str(out)}
    if view == "filmstrip":
        assert any(p.endswith(".gif") for p in written)


def test_views_command_line_errors(tmp_path):
    """Wrong prompt counts and a missing checkpoint are one-line errors."""
    with pytest.raises(SystemExit, match="takes 2 prompts, got 1"):
        views.main(["interpolate", "a cat", "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: "):
        views.main(["filmstrip", "a cat", "--runs-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        views.main(["filmstrip", "a cat", "--ckpt", str(tmp_path / "missing.safetensors")])


# ---------------------------------------------------------------- an image-variations model: image arithmetic

from test_joint_space import clip, folder, model as variations, parts  # noqa: E402,F401  (fixtures)
from test_image_variations import _photo  # noqa: E402


def test_image_arithmetic_strip_is_what_generate_draws(variations):
    """The strip shows the photo, then for each a exactly what generate draws for that JointPrompt and seed;
    a = 0 is the plain variation of the photo."""
    from minildm.joint_space import JointPrompt

    photo = _photo(1, 40, 48)
    strip = views.image_arithmetic(variations, photo, "a dog", "a cat", weights=(0.0, 0.5, 2.0), seed=3, num_steps=3)
    assert strip.labels == ["the photo", "a=0", "a=0.5", "a=2"] and strip.images.shape[0] == 4
    for a, shown in zip((0.5, 2.0), strip.images[2:]):
        x = variations.generate(image_prompt=JointPrompt(images=[photo], minus=["a dog"], plus=["a cat"], weight=a),
                                seed=3, num_steps=3)
        assert np.array_equal(views.to_hwc_uint8(x * 2 - 1)[0], shown)
    plain = views.to_hwc_uint8(variations.generate(image_prompt=photo, seed=3, num_steps=3) * 2 - 1)[0]
    assert np.abs(plain.astype(int) - strip.images[1].astype(int)).max() <= 1
    assert not np.array_equal(strip.images[1], strip.images[3])          # the captions move the picture
    assert len(strip.figure.axes) == 4


def test_image_arithmetic_command_line(folder, clip, tmp_path, capsys):
    """`python -m minildm.views image-arithmetic PHOTO B C --ckpt VARIATIONS --clip CLIP` writes the strip; it
    refuses a missing --clip, --clip with another view, and a text-to-image model, in one line each."""
    photo = tmp_path / "photo.png"
    _photo(2, 44, 40).save(photo)
    common = ["--out", str(tmp_path / "views"), "--steps", "2"]
    assert views.main(["image-arithmetic", str(photo), "a dog", "a cat", "--ckpt", folder, "--clip", clip[0],
                       "--weights", "0", "1", *common]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and os.path.basename(written[0]).startswith("image-arithmetic-photo")
    with pytest.raises(SystemExit, match="needs --clip"):
        views.main(["image-arithmetic", str(photo), "a dog", "a cat", "--ckpt", folder, *common])
    with pytest.raises(SystemExit, match="--clip goes with the image-arithmetic view"):
        views.main(["filmstrip", "a cat", "--ckpt", folder, "--clip", clip[0], *common])
    with pytest.raises(SystemExit, match="image-variations model: of the views"):
        views.main(["filmstrip", "a cat", "--ckpt", folder, *common])
    with pytest.raises(SystemExit, match="takes 3 prompts"):
        views.main(["image-arithmetic", str(photo), "a dog", "--ckpt", folder, "--clip", clip[0], *common])
