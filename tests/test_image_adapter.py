"""Image prompts for a trained model (image_adapter.py): with no image the model is exactly the base model, the
image term is the decoupled cross-attention written out by hand, the pairs are what `pairing` says, training
makes the prompt photo's class easier to denoise, and the file round-trips and refuses another UNet."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minildm import finetune
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.image_adapter import ImageAdapter, ImageAdapterConfig, load_image_adapter
from minildm.ldm import LatentDiffusion
from minildm.schedule import NoiseSchedule
from minildm.tokenizer import CLIPTokenizer
from minildm.unet import UNet, UNetConfig
from minildm.vae import AutoencoderKL, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


def small_model(seed=0, pooled=True):
    """A random text-to-image model shaped like a CIFAR run (pooled caption added to the time embedding)."""
    torch.manual_seed(seed)
    text = CLIPTextConfig.tiny()
    text.context_length = 16
    unet = UNetConfig.tiny()
    unet.pooled_context = pooled
    unet.context_dim = text.width
    with torch.no_grad():
        model = LatentDiffusion(UNet(unet), AutoencoderKL(VAEConfig.tiny()), CLIPTextModel(text),
                                CLIPTokenizer.default(context_length=16), NoiseSchedule.sd(), scale_factor=1.0)
        for p in model.unet.parameters():  # zero-started layers (the output conv) made non-zero
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def adapter_for(model, seed=1):
    torch.manual_seed(seed)
    cfg = ImageAdapterConfig(latent_channels=model.vae.cfg.z_channels, latent_size=8,
                             context_dim=model.unet.cfg.context_dim,
                             emb_dim=model.unet.context_emb.out_features if model.unet.cfg.pooled_context else None)
    adapter = ImageAdapter(cfg, model.unet)
    with torch.no_grad():
        for p in adapter.parameters():  # image_emb starts at zero; make every term show
            p.add_(0.1 * torch.randn_like(p))
    return adapter.eval()


def inputs(model, batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, model.unet.cfg.in_channels, 8, 8, generator=g)
    z_ref = torch.randn(batch, model.vae.cfg.z_channels, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990][:batch])
    with torch.no_grad():
        text = model.encode_prompt(["a photo of a cat", "", "a dog"][:batch])
    return z_t, t, z_ref, text


@pytest.mark.parametrize("pooled", [True, False])
def test_without_an_image_the_model_is_the_base_model_to_the_bit(pooled):
    """Rows whose image tokens are zeros (no image prompt) give the base UNet's output exactly, while rows with
    an image change; after the `with` block the UNet has no hook left."""
    model = small_model(pooled=pooled)
    adapter = adapter_for(model)
    z_t, t, z_ref, text = inputs(model)
    with torch.no_grad():
        base = model.unet(z_t, t, text)
        with adapter.attached(model.unet):
            none = model.unet(z_t, t, adapter.context(None, text))
            mixed_ref = z_ref.clone()
            context = adapter.context(mixed_ref, text)
            context[1, :adapter.cfg.num_tokens] = 0                           # row 1: no image
            mixed = model.unet(z_t, t, context)
        after = model.unet(z_t, t, text)
    assert torch.equal(none, base) and torch.equal(after, base)
    assert torch.equal(mixed[1], base[1])
    assert (mixed[[0, 2]] - base[[0, 2]]).abs().amax() > 1e-3
    assert not model.unet._forward_pre_hooks and not any(m._forward_hooks for m in model.unet.modules())


def test_the_image_term_is_decoupled_cross_attention_written_out():
    """One cross-attention layer with the adapter attached equals to_out(softmax(q k_textᵀ/√d) v_text +
    s softmax(q k_imgᵀ/√d) v_img), computed here from the weights, and the pooled caption's projection gains
    s image_emb(mean of the image tokens); s scales both image terms."""
    model = small_model()
    adapter = adapter_for(model)
    z_t, t, z_ref, text = inputs(model)
    name, attn = next(iter(model.unet.cross_attention_modules().items()))
    seen, pooled = {}, {}
    adapter.scale = 0.7
    with torch.no_grad():
        handle = model.unet.context_emb.register_forward_hook(lambda m, args, out: pooled.update(base=out))
        model.unet(z_t, t, text)
        handle.remove()
    with torch.no_grad(), adapter.attached(model.unet):
        context = adapter.context(z_ref, text)
        handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))  # after the adapter's
        second = model.unet.context_emb.register_forward_hook(lambda m, args, out: pooled.update(out=out))
        model.unet(z_t, t, context)
        handle.remove()
        second.remove()
        tokens = adapter.tokens(z_ref)
    # The pooled caption's term gains s * image_emb(mean of the image tokens).
    expected_pooled = pooled["base"] + 0.7 * F.linear(tokens.mean(1), adapter.image_emb.weight, adapter.image_emb.bias)
    assert torch.allclose(pooled["out"], expected_pooled, atol=1e-5), (pooled["out"] - expected_pooled).abs().max()
    x = seen["x"]
    B, n, C = x.shape
    nh = attn.num_heads

    def heads(a):
        return a.view(B, -1, nh, C // nh).transpose(1, 2)

    def attend(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / (C // nh) ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, n, C)

    key = name.replace(".", "/")
    q = heads(x @ attn.to_q.weight.T)
    text_term = attend(q, heads(text @ attn.to_k.weight.T), heads(text @ attn.to_v.weight.T))
    image_term = attend(q, heads(tokens @ adapter.to_k_ip[key].weight.T), heads(tokens @ adapter.to_v_ip[key].weight.T))
    expected = F.linear(text_term + 0.7 * image_term, attn.to_out[0].weight, attn.to_out[0].bias)
    assert torch.allclose(seen["out"], expected, atol=1e-5), (seen["out"] - expected).abs().max()


def test_the_adapter_starts_from_the_text_keys_and_values():
    """to_k_ip / to_v_ip start as copies of each layer's to_k / to_v (IP-Adapter's start), image_emb at zero."""
    model = small_model()
    torch.manual_seed(0)
    adapter = ImageAdapter(ImageAdapterConfig(latent_channels=4, latent_size=8, context_dim=32, emb_dim=128), model.unet)
    layers = model.unet.cross_attention_modules()
    assert set(adapter.to_k_ip) == {n.replace(".", "/") for n in layers} and len(layers) >= 2
    for name, attn in layers.items():
        assert torch.equal(adapter.to_k_ip[name.replace(".", "/")].weight, attn.to_k.weight)
        assert torch.equal(adapter.to_v_ip[name.replace(".", "/")].weight, attn.to_v.weight)
    assert not adapter.image_emb.weight.any() and not adapter.image_emb.bias.any()


def test_a_context_without_image_tokens_is_refused():
    """With the adapter attached, a plain text context (no room for image tokens) is an error, not a silent slice."""
    model = small_model()
    adapter = adapter_for(model)
    z_t, t, _, text = inputs(model)
    with pytest.raises(ValueError, match="image tokens"), torch.no_grad(), adapter.attached(model.unet):
        model.unet(z_t, t, text[:, :4])


def test_pairs_are_another_photo_of_the_class_or_the_photo_itself():
    """pairing "class": a different photo with the same label (itself only when alone in its class); "self": itself."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    rows = torch.arange(6).repeat(20)
    g = torch.Generator().manual_seed(0)
    refs = finetune.reference_rows(rows, labels, "class", g)
    assert torch.equal(labels[refs], labels[rows])
    assert (refs != rows)[labels[rows] != 2].all() and (refs == rows)[labels[rows] == 2].all()
    assert len(set(refs[rows == 0].tolist())) == 2                   # both other cats, drawn at random
    assert torch.equal(finetune.reference_rows(rows, labels, "self", g), rows)
    # Mirrored copies after the originals (rows i and i + 6 are one photo): a photo is never its own reference.
    doubled, rows2 = torch.cat([labels, labels]), torch.arange(12).repeat(20)
    refs = finetune.reference_rows(rows2, doubled, "class", g, photos=6)
    assert torch.equal(doubled[refs], doubled[rows2])
    assert (refs % 6 != rows2 % 6)[doubled[rows2] != 2].all() and (refs % 6 == rows2 % 6)[doubled[rows2] == 2].all()
    with pytest.raises(ValueError, match="pairing"):
        finetune.reference_rows(rows, labels, "random", g)


def coloured_photos(per_class=12, seed=0):
    """Photos of two classes told apart by colour alone (red-ish / blue-ish), with noise: uint8 (N, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.2, 0.8]])
    labels = torch.arange(2).repeat_interleave(per_class)
    x = base[labels][:, :, None, None] + 0.15 * torch.randn(len(labels), 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def objective(model, adapter, z, refs, seed=5):
    """The stage-2 objective on latents z prompted with refs, on fixed draws of t and noise."""
    g = torch.Generator().manual_seed(seed)
    empty = model.encode_prompt([""] * len(z))
    total = 0.0
    with torch.no_grad(), adapter.attached(model.unet):
        for _ in range(4):
            t = torch.randint(0, 1000, (len(z),), generator=g)
            noise = torch.randn(z.shape, generator=g)
            eps = model.unet(model.schedule.q_sample(z, t, noise), t, adapter.context(refs, empty))
            total += F.mse_loss(eps, noise).item()
    return total / 4


def test_training_lowers_the_objective_and_leaves_the_base_model_alone():
    """Twenty steps of train_image_adapter lower the objective on the training photos prompted with another photo
    of their class, from the start the seed draws (0 steps); the base model's weights are untouched and the
    caller's random stream is not consumed by the adapter's start."""
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = coloured_photos(per_class=8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    start, _ = finetune.train_image_adapter(model, images, labels, num_steps=0, progress=False)
    assert torch.equal(torch.rand(3), expected)
    trained, losses = finetune.train_image_adapter(model, images, labels, num_steps=20, batch_size=8, lr=1e-2,
                                                   progress=False)
    assert len(losses) == 20
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in trained.parameters())
    with torch.no_grad():
        z = model.encode_image(images.float() / 127.5 - 1)
    refs = z[torch.where(labels == 0, 1, 8)]                           # another photo of the same class
    assert objective(model, trained, z, refs) < 0.97 * objective(model, start, z, refs)


def test_the_file_round_trips_and_refuses_another_unet(tmp_path):
    """save then load_image_adapter gives the same numbers and config without touching the global random stream;
    a UNet with other layers, another context width or no pooled caption, and a damaged file, are refused."""
    from minildm.convert import CheckpointError

    model = small_model()
    adapter = adapter_for(model)
    adapter.save(tmp_path / "a.safetensors", {"note": "x"})
    loaded = load_image_adapter(tmp_path / "a.safetensors", model.unet)
    assert loaded.cfg == adapter.cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapter.state_dict().items())
    other = UNetConfig.tiny()
    other.context_dim = 32
    other.pooled_context = True
    other.channel_mult = (1, 2, 2)
    other.attention_levels = (0, 1, 2)
    with pytest.raises(CheckpointError, match="another UNet"):
        load_image_adapter(tmp_path / "a.safetensors", UNet(other))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="not an image adapter"):
        load_image_adapter(tmp_path / "b.safetensors", model.unet)
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="truncated"):                # one line, no traceback
        load_image_adapter(tmp_path / "c.safetensors", model.unet)
    for unpooled_or_wider in (dict(pooled_context=False), dict(context_dim=64)):
        same_layers = UNetConfig.tiny()
        same_layers.pooled_context, same_layers.context_dim = True, 32
        for key, value in unpooled_or_wider.items():
            setattr(same_layers, key, value)
        with pytest.raises(CheckpointError, match="another UNet"):
            load_image_adapter(tmp_path / "a.safetensors", UNet(same_layers))
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    load_image_adapter(tmp_path / "a.safetensors", model.unet)
    assert torch.equal(torch.rand(2), expected)                      # loading draws nothing from the stream


def test_command_line_trains_an_adapter_and_evaluate_scores_image_prompts(tmp_path):
    """`finetune image-prompt --ckpt RUN` trains on the run's training split and writes a loadable file;
    `evaluate --image-adapter` prompts each class with its held-out photos and reports the class accuracy and how
    near samples are to their own prompt; a file that is not a run's folder is a usage error (2), an n that leaves
    fewer than two held-out photos to compare with a failure found once the data is read (1)."""
    from test_evaluate import ENV, fabricated_cifar

    tree = fabricated_cifar(tmp_path)
    train = [sys.executable, "-m", "minildm.train", "--dataset", "cifar", "--data-dir", str(tree), "--preset", "tiny",
             "--holdout-per-class", "4", "--max-steps", "2", "--batch-size", "8", "--vae-batch-size", "8",
             "--warmup-steps", "1", "--sample-steps", "2", "--probe-per-class", "0", "--runs-dir", "runs",
             "--name", "tiny"]
    result = subprocess.run(train, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    command = [sys.executable, "-m", "minildm.finetune", "image-prompt", "--ckpt", "runs/tiny", "--steps", "3",
               "--batch-size", "4", "--out", "photo-prompts.safetensors"]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on its 40 training photos" in result.stderr and "wrote photo-prompts.safetensors" in result.stdout
    from minildm.ldm import load_stable_diffusion
    model = load_stable_diffusion(str(tmp_path / "runs" / "tiny" / "model.safetensors"))
    adapter = load_image_adapter(tmp_path / "photo-prompts.safetensors", model.unet)
    assert adapter.cfg.pairing == "class" and adapter.cfg.latent_size == 32 // model.downsample_factor

    evaluate = [sys.executable, "-m", "minildm.evaluate", "runs/tiny", "--image-adapter", "photo-prompts.safetensors",
                "--n", "2", "--steps", "2", "--judge-steps", "3", "--batch-size", "20"]
    result = subprocess.run(evaluate, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "image prompts (a held-out photo of the class, no text): class accuracy" in result.stdout
    import json
    report = json.loads(next((tmp_path / "runs" / "tiny" / "eval").glob("*image-photo-prompts.json")).read_text())
    assert report["image_adapter"] == "photo-prompts.safetensors" and "unseen" not in report
    assert set(report["image_prompts"]) == {"photos", "distance_to_own_prompt", "distance_to_another_photo",
                                            "own_over_another"}
    assert all(0 <= c["accuracy"] <= 1 for c in report["per_class"].values())
    evaluate[evaluate.index("--n") + 1] = "3"
    result = subprocess.run(evaluate, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "--n must be at most 2 here" in result.stderr

    os.makedirs(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "model.safetensors").write_bytes((tmp_path / "runs" / "tiny" /
                                                                "model.safetensors").read_bytes())
    command[command.index("runs/tiny")] = "elsewhere/model.safetensors"
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "not a training run's folder" in result.stderr


def photos(n=2, seed=0):
    """n photos of odd sizes (uint8), so encode_photo_prompt resizes and crops them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 40 + 4 * i, 36), generator=g, dtype=torch.uint8) for i in range(n)]


@pytest.fixture()
def adapted(tmp_path):
    """A small model with an image adapter file loaded through LatentDiffusion.load_image_adapter."""
    model = small_model()
    adapter = adapter_for(model)
    adapter.cfg.latent_size = 16                     # 32 px photos through the tiny VAE (factor 2)
    fresh = ImageAdapter(adapter.cfg, model.unet)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fresh.save(tmp_path / "adapter.safetensors")
    return model, tmp_path / "adapter.safetensors"


def test_generate_reads_photos_beside_the_text(adapted):
    """With an adapter loaded, text alone draws exactly what the base model draws; a photo changes the picture,
    each photo its own way; sample i of a seeds batch is what seed i alone gives; at scale 0 the photo changes
    nothing."""
    model, path = adapted
    options = dict(num_steps=3, seed=0, height=32, width=32)
    base = model.generate("a cat", **options)
    model.load_image_adapter(path)
    assert torch.equal(model.generate("a cat", **options), base)
    one, two = photos()
    with_one = model.generate("a cat", image_prompt=one, **options)
    assert (with_one - base).abs().max() > 1e-3
    assert (model.generate("a cat", image_prompt=two, **options) - with_one).abs().max() > 1e-3
    batch = model.generate("", image_prompt=[one, two], seeds=[5, 6], num_steps=3, height=32, width=32)
    alone = model.generate("", image_prompt=two, seed=6, num_steps=3, height=32, width=32)
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    model.load_image_adapter(path, scale=0.0)
    assert torch.equal(model.generate("a cat", image_prompt=one, **options), base)
    with pytest.raises(ValueError, match="2 prompts and 3 image prompts"):
        model.generate(["a", "b"], image_prompt=photos(3), num_steps=2, height=32, width=32)


def test_a_model_without_an_adapter_refuses_a_photo_and_says_how():
    """generate(image_prompt=...) on a text-to-image model with no adapter names both ways to read images."""
    model = small_model()
    with pytest.raises(ValueError, match="image adapter"):
        model.generate("", image_prompt=photos(1)[0], num_steps=2, height=32, width=32)


def test_sample_command_line_with_an_image_adapter(adapted, tmp_path, monkeypatch):
    """`sample "a cat" --image-adapter FILE --image-prompt photo.png` draws what generate draws with that photo and
    records the adapter in the PNG; the flags that belong to image-variations models, two photos, and an adapter
    without a photo are refused in one line."""
    import json

    from PIL import Image

    from minildm import convert
    from minildm.sample import main as sample_main

    model, path = adapted
    ckpt = tmp_path / "run" / "model.safetensors"
    convert.save_checkpoint(ckpt, unet=model.unet, vae=model.vae, text_encoder=model.text_encoder,
                            schedule=model.schedule, scale_factor=model.scale_factor)
    photo = photos(1)[0]
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(ckpt), "--steps", "3", "--seed", "4", "--height", "32", "--width", "32", "--out", "out"]
    assert sample_main(["a cat", "--image-adapter", f"{path}:0.5", "--image-prompt", "cat.png", *common]) == 0
    written = Image.open(tmp_path / "out" / "a-cat-like-cat-4.png")
    settings = json.loads(written.text["minildm"])
    assert settings["image_adapter"] == [str(path), 0.5] and settings["image_prompt"].endswith("cat.png")

    from minildm.ldm import load_stable_diffusion
    again = load_stable_diffusion(str(ckpt))
    again.load_image_adapter(path, scale=0.5)
    x = again.generate("a cat", image_prompt=Image.open(tmp_path / "cat.png"), seed=4, num_steps=3, height=32, width=32)
    drawn = torch.from_numpy(numpy_of(written).copy()).permute(2, 0, 1).float() / 255
    assert (drawn - x[0]).abs().max() <= 1 / 255 + 1e-6

    refused = {"two photos": (["--image-prompt", "cat.png", "--image-prompt", "cat.png"], "reads one photo"),
               "a caption for CLIP's space": (["--image-prompt", "cat.png", "--plus", "a dog"], "--plus moves"),
               "no photo": ([], "reads one photo"),
               "a negative scale": (["--image-prompt", "cat.png"], "--image-adapter scale")}
    for name, (extra, words) in refused.items():
        adapter = f"{path}:-1" if name == "a negative scale" else str(path)
        with pytest.raises(SystemExit, match=words) as e:
            sample_main(["a cat", "--image-adapter", adapter, *extra, *common])
        assert e.value.code == 2, name


def numpy_of(image):
    import numpy
    return numpy.asarray(image.convert("RGB"))


from test_joint_space import folder, parts  # noqa: E402,F401  (fixtures: a tiny image-variations folder)


def test_an_image_adapter_on_an_image_variations_model_is_a_usage_error(folder, adapted, tmp_path, monkeypatch):
    """--image-adapter names a model you trained; on an image-variations folder it is refused with exit 2."""
    from PIL import Image

    from minildm.sample import main as sample_main

    _, path = adapted
    Image.fromarray(photos(1)[0].permute(1, 2, 0).numpy()).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="is an image-variations model") as e:
        sample_main(["--ckpt", folder, "--image-adapter", str(path), "--image-prompt", "cat.png", "--steps", "2"])
    assert e.value.code == 2
