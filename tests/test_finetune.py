"""Fine-tuning: a LoRA or a new word trained by minildm is exactly the file it writes, that file changes
diffusers' images as it changes minildm's, and the command line trains, saves and samples with it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minildm import convert, finetune
from minildm.lora import LCM_LORA_TARGETS
from minildm.schedule import NoiseSchedule
from test_convert import UNET_3LEVEL, tiny_models
from test_ldm import (SIZE, as_denoisers, assert_close_to_reference, load_original, models, original_file,  # noqa: F401
                      reference_pipeline)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a black and white photo of a cat"
TRAIN = dict(num_steps=4, batch_size=2, lr=0.05, progress=False)   # a large rate: a few steps must show


def handful(n=4, seed=0):
    """n smooth random images (uint8) and their captions."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(small, size=SIZE, mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8), [PROMPT] * n


def unet_output(model, prompt=PROMPT):
    z = torch.randn(2, model.unet.cfg.in_channels, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.unet(z, torch.tensor([10, 700]), model.encode_prompt([prompt, ""]))


def diffusers_module_names(unet, targets):
    """The names of diffusers' UNet layers a trainer with these targets adapts (diffusers' own model)."""
    return {name for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple("." + t for t in targets))}


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_lora_layers_start_at_zero_and_are_the_only_trainable_numbers(models, original_file, tmp_path, targets):
    """add_lora adapts exactly the layers diffusers' UNet has under those names; at step 0 the model is the
    base model to the bit; only the low-rank pairs train; removing them without merging restores it."""
    model = load_original(original_file)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = unet_output(model)
    adapters = finetune.add_lora(model, rank=2, targets=targets)
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path)
    wanted = diffusers_module_names(pipe.unet, finetune.TARGETS[targets])
    assert {d.name for d in adapters.values()} == wanted and wanted
    assert torch.equal(unet_output(model), base)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for d in adapters.values() for p in (d.down, d.up)}
    finetune.remove_lora(model, adapters, merge=False)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_seed_draws_the_lora_start(original_file):
    """A's initial values come from the seed, so the same command gives the same fine-tune's start."""
    downs = []
    for seed in (3, 3, 4):
        adapters = finetune.add_lora(load_original(original_file), rank=2, seed=seed)
        downs.append(torch.cat([d.down.flatten() for d in adapters.values()]))
    assert torch.equal(downs[0], downs[1]) and not torch.equal(downs[0], downs[2])


@pytest.mark.parametrize("layout, targets, text_encoder", [("kohya", "attention", True), ("diffusers", "all", False)])
def test_trained_lora_is_its_file_in_minildm_and_in_diffusers(models, original_file, tmp_path, layout, targets,
                                                               text_encoder):
    """The fine-tuned model equals the base model with the written file merged; diffusers' load_lora_weights
    of the same file gives the image minildm gives (the pipeline tests' tolerance), a different one from the
    base model's."""
    pytest.importorskip("peft")
    images, captions = handful()
    tuned = load_original(original_file)
    state, losses = finetune.train_lora(tuned, images, captions, rank=2, targets=targets,
                                        text_encoder=text_encoder, layout=layout, **TRAIN)
    assert len(losses) == TRAIN["num_steps"] and all(map(torch.isfinite, torch.tensor(losses)))
    path = tmp_path / f"{layout}.safetensors"
    finetune.save_tensors(path, state, {"minildm_fine_tune": {"steps": 4}})

    loaded = load_original(original_file)
    assert loaded.load_lora(path) == len(state) // (3 if layout == "kohya" else 2)
    expected = loaded.state_dict()
    assert tuned.state_dict().keys() == expected.keys()
    for k, a in tuned.state_dict().items():
        torch.testing.assert_close(a, expected[k], atol=1e-6, rtol=0, msg=k)

    base = load_original(original_file)
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path)
    pipe.load_lora_weights(str(path))
    as_denoisers(tuned.unet, base.unet, pipe.unet)
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
    options = dict(num_steps=4, guidance_scale=5.0, latents=latents, output_type="latent")
    z, plain = tuned.generate(PROMPT, **options), base.generate(PROMPT, **options)
    with torch.no_grad():
        z_ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, latents=latents,
                     output_type="latent").images
    assert_close_to_reference(z, z_ref, f"{layout} LoRA")
    assert (z - plain).abs().max().item() > 1e-2      # the fine-tune changed the image


def test_trained_word_is_its_file_in_minildm_and_in_diffusers(models, original_file, tmp_path):
    """Textual inversion trains the new word's vectors and nothing else; the file ({word: (n, D)}) gives the
    same context in a fresh model and in diffusers' load_textual_inversion, and prompts without the word are
    unchanged."""
    images, _ = handful()
    word = "<bw>"
    tuned = load_original(original_file)
    table = tuned.text_encoder.embeddings.token_embedding.weight.clone()
    start = table[tuned.tokenizer.encode("photo")].mean(0)
    vectors, _ = finetune.train_word(tuned, images, [f"a {word} photo of a cat"] * 4, word, num_vectors=2, **TRAIN)
    assert vectors.shape == (2, table.shape[1]) and not torch.allclose(vectors, start.expand(2, -1))
    new_table = tuned.text_encoder.embeddings.token_embedding.weight
    assert torch.equal(new_table[:len(table)], table) and torch.equal(new_table[len(table):], vectors)
    path = tmp_path / "bw.safetensors"
    finetune.save_tensors(path, {word: vectors}, {})

    fresh = load_original(original_file)
    assert fresh.load_textual_inversion(path) == word
    prompt = f"a {word} photo of a dog"
    torch.testing.assert_close(fresh.encode_prompt(prompt), tuned.encode_prompt(prompt), atol=0, rtol=0)
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path)
    pipe.load_textual_inversion(str(path))
    with torch.no_grad():
        reference = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    torch.testing.assert_close(fresh.encode_prompt(prompt), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.encode_prompt("a photo of a dog"), load_original(original_file).encode_prompt(
        "a photo of a dog"), atol=0, rtol=0)


def test_a_word_trains_on_the_captions_that_have_it(original_file, monkeypatch):
    """Images whose caption lacks the word are left out (they would train nothing); none at all is an error."""
    model = load_original(original_file)
    with pytest.raises(ValueError, match="no caption contains the new word '<bw>'"):
        finetune.train_word(model, *handful(2), "<bw>", **TRAIN)
    images, captions = handful(4)
    captions[1] = "a <bw> photo of a cat"
    calls = []
    monkeypatch.setattr(finetune, "fine_tune", lambda m, x, c, params, **kw: calls.append((len(x), c)) or [0.0])
    finetune.train_word(model, images, captions, "<bw>", **TRAIN)
    assert calls == [(1, ["a <bw> photo of a cat"])]


def test_lora_on_a_model_with_a_pooled_caption(tmp_path):
    """The small presets add the pooled caption to the time embedding (context_emb, diffusers' "simple_projection"
    class embedding): a LoRA can adapt it ("all" has no such target, but loading a file that names it works), and
    a LoRA trained on such a model is its file, as for SD v1."""
    unet, vae, text = tiny_models(seed=2, unet=dict(UNET_3LEVEL, pooled_context=True))
    assert unet.cfg.pooled_context
    path = convert.save_checkpoint(tmp_path / "run.safetensors", unet=unet, vae=vae, text_encoder=text,
                                   schedule=NoiseSchedule.sd(), scale_factor=0.5)
    from minildm.ldm import load_stable_diffusion
    tuned = load_stable_diffusion(path)
    state, _ = finetune.train_lora(tuned, *handful(), rank=2, targets="all", **TRAIN)
    lora_path = tmp_path / "lora.safetensors"
    finetune.save_tensors(lora_path, state, {})
    loaded = load_stable_diffusion(path)
    loaded.load_lora(lora_path)
    torch.testing.assert_close(unet_output(loaded), unet_output(tuned), atol=1e-6, rtol=0)
    from minildm.lora import diffusers_names
    names = diffusers_names(loaded.unet, "unet")
    assert names["context_emb.weight"] == "class_embedding"


def test_saturation_and_the_example_set():
    from minildm.data import CaptionedImages

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = CaptionedImages(images, ["x"] * 6, labels=[0, 0, 0, 1, 1, 1], class_names=["apple", "cat"])
    chosen, captions = finetune.example_set(data, per_class=1)
    assert captions == ["a black and white photo of an apple", "a black and white photo of a cat", "a photo of an apple",
                        "a photo of a cat"]
    assert finetune.saturation(chosen[:2]).max().item() == 0.0 and finetune.saturation(chosen[2:]).min().item() > 0.3
    grey_only, captions = finetune.example_set(data, per_class=2, colour=False)
    assert len(grey_only) == 4 and all(c.startswith("a black and white photo of ") for c in captions)
    assert finetune.saturation(images).min().item() > 0.3
    assert torch.allclose(finetune.saturation(images), finetune.saturation(images.float() / 127.5 - 1), atol=1e-6)


# ---------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    unet, vae, text = tiny_models()
    convert.save_checkpoint(root / "runs" / "tiny" / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=NoiseSchedule.sd(), scale_factor=0.5)
    images, _ = handful(3)
    (root / "photos" / "dog").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "photos" / "dog" / f"{i}.png")
    return root


def run(workdir, module, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def test_command_line_lora_and_word_then_sample_with_them(workdir):
    """finetune lora / embedding write files that `sample --lora` / `--embedding` load and record."""
    common = ["--images", "photos", "--steps", "3", "--batch-size", "2"]
    result = run(workdir, "minildm.finetune", "lora", *common, "--caption", "a black and white photo of a {}",
                 "--rank", "2", "--out", "bw-lora.safetensors")
    assert result.returncode == 0, result.stderr
    assert "a black and white photo of a dog" in result.stderr and "wrote bw-lora.safetensors" in result.stdout
    from safetensors import safe_open
    with safe_open(str(workdir / "bw-lora.safetensors"), "pt") as f:
        made = json.loads(f.metadata()["minildm_fine_tune"])
        keys = list(f.keys())
    assert made["kind"] == "lora" and made["images"] == 3 and made["steps"] == 3
    assert all(k.startswith("lora_unet_") for k in keys)

    result = run(workdir, "minildm.finetune", "embedding", *common, "--caption", "a <bw> photo of a {}",
                 "--word", "<bw>", "--out", "bw-word.safetensors")
    assert result.returncode == 0, result.stderr
    result = run(workdir, "minildm.sample", "a <bw> photo of a dog", "--lora", "bw-lora.safetensors", "--embedding",
                 "bw-word.safetensors", "--steps", "2", "--seed", "0", "--out", "out")
    assert result.returncode == 0, result.stderr
    assert "layers merged" in result.stderr and len(list((workdir / "out").glob("*.png"))) == 1


def test_command_line_example_set(tmp_path):
    """`finetune example` writes PNGs of held-out photos, one per class in black and white and one in colour,
    with captions.jsonl."""
    from test_evaluate import fabricated_cifar

    data = fabricated_cifar(tmp_path / "cifar", per_class=3)
    result = run(tmp_path, "minildm.finetune", "example", "--data-dir", str(data), "--per-class", "1", "--out", "bw")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "bw" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and sum(r["text"].startswith("a black and white photo of ") for r in rows) == 10
    for row in (rows[0], rows[-1]):
        image = torch.tensor(list(Image.open(tmp_path / "bw" / row["file_name"]).getdata()))
        grey = bool((image.amax(1) == image.amin(1)).all())
        assert grey == row["text"].startswith("a black and white"), row


def test_layer_and_parameter_counts_at_sd15_size():
    """At SD v1.5's size (meta device, no memory): the lesson's table, recomputed. "all" at rank 64 is the
    LCM-LoRA's 278 layers and 67,252,224 numbers (minildm.lora, LCM_LORA_TARGETS' comment)."""
    from minildm.clip_text import CLIPTextConfig, CLIPTextModel
    from minildm.ldm import LatentDiffusion
    from minildm.tokenizer import CLIPTokenizer
    from minildm.unet import UNet, UNetConfig
    from minildm.vae import AutoencoderKL, VAEConfig

    schedule = NoiseSchedule.sd()
    with torch.device("meta"):
        model = LatentDiffusion(UNet(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd()), CLIPTextModel(CLIPTextConfig()),
                                CLIPTokenizer.default(), schedule=schedule)
        counts = []
        for targets, rank, text_encoder in (("attention", 4, False), ("attention", 4, True), ("all", 4, False),
                                            ("all", 64, False)):
            adapters = finetune.add_lora(model, rank=rank, targets=targets, text_encoder=text_encoder)
            counts.append((len(adapters), sum(p.numel() for d in adapters.values() for p in (d.down, d.up))))
            finetune.remove_lora(model, adapters, merge=False)
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    assert counts == [(128, 797_184), (176, 1_092_096), (278, 4_203_264), (278, 67_252_224)]
    assert set(LCM_LORA_TARGETS) == set(finetune.TARGETS["all"])


def test_lora_of_a_pooled_caption_model_loads_in_diffusers(tmp_path):
    """A CIFAR-shaped UNet (pooled caption added to the time embedding) is diffusers' UNet2DConditionModel with a
    "simple_projection" class embedding fed context[:, -1]. Its weights converted by diffusers' own converter (the
    pooled layer, which that converter does not know, put in by hand), then a LoRA trained by minildm loaded with
    load_lora_weights: diffusers' UNet output equals minildm's fine-tuned one."""
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from minildm.ldm import load_stable_diffusion
    from reference_configs import diffusers_unet_config
    from test_convert import original_state
    from test_ldm import diffusers_parts, write_tokenizer_folder

    models = tiny_models(seed=3, unet=dict(UNET_3LEVEL, pooled_context=True))
    unet, vae, text = models
    path = convert.save_checkpoint(tmp_path / "run.safetensors", unet=unet, vae=vae, text_encoder=text,
                                   schedule=NoiseSchedule.sd(), scale_factor=0.5)
    tuned = load_stable_diffusion(path)
    state, _ = finetune.train_lora(tuned, *handful(), rank=2, targets="all", text_encoder=True, **TRAIN)
    lora_path = tmp_path / "lora.safetensors"
    finetune.save_tensors(lora_path, state, {})

    config = dict(diffusers_unet_config(unet.cfg), class_embed_type="simple_projection",
                  projection_class_embeddings_input_dim=unet.cfg.context_dim)
    d_unet = UNet2DConditionModel(**config)
    original = original_state(unet, vae, text, ema_offset=0.0)
    converted = sfu.convert_ldm_unet_checkpoint(dict(original), d_unet.config, extract_ema=True)
    converted["class_embedding.weight"] = unet.context_emb.weight.detach().clone()
    converted["class_embedding.bias"] = unet.context_emb.bias.detach().clone()
    d_unet.load_state_dict(converted)
    _, d_vae, d_text, tokenizer = diffusers_parts(models, write_tokenizer_folder(str(tmp_path / "tok")))
    pipe = StableDiffusionPipeline(vae=d_vae, text_encoder=d_text, tokenizer=tokenizer, unet=d_unet.eval(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_path))
    z = torch.randn(2, unet.cfg.in_channels, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = tuned.unet(z, t, tuned.encode_prompt([PROMPT, ""]))
        tokens = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        context = pipe.text_encoder(tokens)[0]
        theirs = pipe.unet(z, t, encoder_hidden_states=context, class_labels=context[:, -1]).sample
        base_model = load_stable_diffusion(path)
        base = base_model.unet(z, t, base_model.encode_prompt([PROMPT, ""]))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3
