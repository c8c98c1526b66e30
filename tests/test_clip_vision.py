"""CLIP's image tower and the shared image-text space: parity with transformers' CLIPModel,
CLIPVisionModelWithProjection and CLIPTextModelWithProjection, the real folder layout, strict loading,
and CLIP's preprocessing against transformers' CLIPImageProcessor."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from minildm import convert
from minildm.clip_text import CLIPTextConfig
from minildm.clip_vision import (CLIPModel, CLIPVisionConfig, CLIPVisionModel, load_clip, pool_text,
                                 preprocess)
from minildm.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.tar.gz"

VIT_L14_IMAGE_TOWER = 303_179_776           # vision_model alone
VIT_L14_IMAGE_ENCODER = 303_966_208         # + visual_projection: CLIPVisionModelWithProjection
VIT_L14_CLIP = 427_616_513                  # both towers, both projections and logit_scale: CLIPModel

# The sizes in openai/clip-vit-large-patch14's config.json, as written there (transformers 4.16 wrote every
# field, eos_token_id 2 included, and repeated the sizes in *_config_dict).
OPENAI_VIT_L14 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
                    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                    "dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "projection_dim": 768,
                      "dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}

# A tiny CLIP in transformers' terms, written out by hand (not derived from minildm's configs).
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=24)
TINY_VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, intermediate_size=96,
                   num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=24)


def _randomize(model, seed):
    """Weights far from transformers' initialisation, so every layer norm, token and position matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name == "logit_scale":
                p.fill_(2.0)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def _pooled(output):
    """The projected embeddings of get_image_features/get_text_features (a tensor before transformers 5)."""
    return getattr(output, "pooler_output", output)


def _as_old_file(folder):
    """Rewrite a saved folder's weights as older transformers wrote them, with the position_ids buffers."""
    path = folder / "model.safetensors"
    state = safetensors_torch.load_file(path)
    for tower, n in (("text_model", TINY_TEXT["max_position_embeddings"]),
                     ("vision_model", (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2 + 1)):
        if any(k.startswith(tower + ".") for k in state):
            state[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
    safetensors_torch.save_file(state, path, metadata={"format": "pt"})


def _assert_close(ours, expected, what):
    diff = (ours - expected).abs()
    assert ours.shape == expected.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(expected.shape)}"
    assert diff.max() <= 1e-5, f"{what}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def _tokens(tokenizer):
    """Real prompts: padded with <|endoftext|> as SD pads, and one row padded with zeros as transformers pads."""
    tokens = tokenizer(["a photo of a cat", "a diagram of a bicycle on a hill at night", ""])
    tokens[2, 2:] = 0
    return tokens


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random tiny transformers CLIPModel saved as openai/clip-vit-large-patch14 is (legacy eos_token_id 2,
    position_ids in the file), and the model itself."""
    config = transformers.CLIPConfig(text_config={**TINY_TEXT, "eos_token_id": 2}, vision_config=TINY_VISION,
                                     projection_dim=24)
    ref = _randomize(transformers.CLIPModel(config), seed=1)
    folder = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(folder)
    _as_old_file(folder)
    return folder, ref


def test_clip_model_matches_transformers(clip_folder, tokenizer):
    """Loaded from the folder, image and text embeddings and logits_per_image equal transformers' CLIPModel's."""
    folder, ref = clip_folder
    ours = load_clip(folder)
    assert ours.text_model is not None
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = _tokens(tokenizer)
    with torch.no_grad():
        _assert_close(ours.encode_image(pixels), _pooled(ref.get_image_features(pixel_values=pixels)), "image_embeds")
        _assert_close(ours.encode_text(tokens), _pooled(ref.get_text_features(input_ids=tokens)), "text_embeds")
        _assert_close(ours(pixels, tokens), ref(input_ids=tokens, pixel_values=pixels).logits_per_image,
                      "logits_per_image")


def test_text_projection_matches_clip_text_model_with_projection(clip_folder, tokenizer):
    """Pooled at <|endoftext|> and projected, the text side equals CLIPTextModelWithProjection (eos 49407)."""
    folder, ref = clip_folder
    ours = load_clip(folder)
    text_ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_TEXT, eos_token_id=49407))
    wanted = {k: v for k, v in ref.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    text_ref.load_state_dict(wanted, strict=True)
    tokens = _tokens(tokenizer)
    with torch.no_grad():
        _assert_close(ours.encode_text(tokens), text_ref.eval()(input_ids=tokens).text_embeds, "text_embeds")


def test_image_encoder_folder_matches_clip_vision_model_with_projection(tmp_path):
    """An image-encoder folder (SD image variations' image_encoder/) loads without a text tower and gives
    CLIPVisionModelWithProjection's image_embeds."""
    ref = _randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)), 3)
    ref.save_pretrained(tmp_path / "image_encoder")
    _as_old_file(tmp_path / "image_encoder")
    ours = load_clip(tmp_path)                                  # the pipeline folder: read from image_encoder/
    assert ours.text_model is None and ours.logit_scale is None
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _assert_close(ours.encode_image(pixels), ref(pixel_values=pixels).image_embeds, "image_embeds")
    with pytest.raises(ValueError, match="no text tower"):
        ours.encode_text(torch.full((1, 77), 49407))


def test_vit_l14_parameter_counts_and_keys_match_transformers():
    """On the meta device, ViT-L/14's CLIPModel and image encoder have transformers' exact parameter counts,
    keys and shapes, and openai's config.json maps to the vit_l14 presets."""
    d = OPENAI_VIT_L14
    text = convert.text_config_from_transformers({**d["text_config"], **d["text_config_dict"]})
    vision = convert.vision_config_from_transformers({**d["vision_config"], **d["vision_config_dict"]},
                                                     d["projection_dim"])
    assert (vision, text) == (CLIPVisionConfig.vit_l14(), CLIPTextConfig.vit_l14())
    with torch.device("meta"):
        ref_config = transformers.CLIPConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                                             projection_dim=d["projection_dim"])
        pairs = [(CLIPModel(vision, text), transformers.CLIPModel(ref_config), VIT_L14_CLIP),
                 (CLIPModel(vision), transformers.CLIPVisionModelWithProjection(
                     transformers.CLIPVisionConfig(**d["vision_config"])), VIT_L14_IMAGE_ENCODER)]
    for ours, ref, count in pairs:
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert got == expected, (f"missing {sorted(set(expected) - set(got))[:5]}, "
                                 f"unexpected {sorted(set(got) - set(expected))[:5]}")
    assert sum(p.numel() for p in pairs[1][0].vision_model.parameters()) == VIT_L14_IMAGE_TOWER


def test_configs_saved_without_defaults_read_as_transformers_reads_them():
    """A config.json that leaves out transformers' default values gives the sizes transformers gives it."""
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "patch_size": 14, "projection_dim": 768}
    text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}
    for vision_fields, text_fields in ((vision, text), ({}, {})):               # ViT-L/14, then all defaults
        full_vision = transformers.CLIPVisionConfig(**vision_fields).to_dict()
        full_text = transformers.CLIPTextConfig(**text_fields).to_dict()
        assert (convert.vision_config_from_transformers(vision_fields)
                == convert.vision_config_from_transformers(full_vision))
        assert convert.text_config_from_transformers(text_fields) == convert.text_config_from_transformers(full_text)
    assert convert.vision_config_from_transformers(vision) == CLIPVisionConfig.vit_l14()


def _save_tiny_image_encoder(folder):
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(folder)
    return folder / "model.safetensors", folder / "config.json"


def test_strict_loading_names_what_does_not_fit(tmp_path):
    """An unexpected key, a missing key and a wrong shape are refused by name, not loaded half way."""
    weights, config = _save_tiny_image_encoder(tmp_path)
    state = safetensors_torch.load_file(weights)

    safetensors_torch.save_file({**state, "vision_model.head.weight": torch.zeros(3)}, weights)
    with pytest.raises(convert.CheckpointError, match=r"1 unexpected keys in vision_model\.head"):
        load_clip(tmp_path)

    safetensors_torch.save_file({k: v for k, v in state.items() if k != "visual_projection.weight"}, weights)
    with pytest.raises(convert.CheckpointError, match=r"missing 1 keys in visual_projection"):
        load_clip(tmp_path)

    safetensors_torch.save_file(state, weights)
    d = json.loads(config.read_text())
    config.write_text(json.dumps({**d, "intermediate_size": 80}))
    with pytest.raises(convert.CheckpointError, match=r"shapes differ.*mlp\.fc1\.weight \(96, 48\) vs \(80, 48\)"):
        load_clip(tmp_path)

    config.write_text(json.dumps(d))
    assert load_clip(tmp_path).vision_model.cfg.mlp_width == 96          # the same file, restored, loads


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "OpenCLIP"),
    ({"model_type": "clip_text_model"}, "text encoder alone"),
    ({"model_type": "siglip_vision_model"}, "not transformers' CLIP"),
])
def test_folders_that_are_not_openai_clip_are_named(tmp_path, change, message):
    """A GELU (OpenCLIP) tower, a text encoder alone, or another model family is refused with what it is."""
    _, config = _save_tiny_image_encoder(tmp_path)
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(convert.CheckpointError, match=message):
        load_clip(tmp_path)


def test_text_pools_at_the_first_end_of_text_token(tokenizer):
    """Pooling picks OpenAI's position (the largest id) for tokenizer output, and still the end-of-text
    token when a textual-inversion token (an id past it) is in the prompt; a row without one is refused."""
    context = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="dropped"):                      # truncated, <|endoftext|> kept
        tokens = tokenizer(["a cat", "a very long caption " * 30, ""])
    openai = context[torch.arange(3), tokens.argmax(dim=-1)]
    assert torch.equal(pool_text(context, tokens), openai)

    tokenizer = CLIPTokenizer.default()
    (new_id,) = tokenizer.add_tokens("<my-cat>")
    tokens = tokenizer(["a photo of <my-cat> on a sofa"])
    eot = tokens[0].tolist().index(49407)
    assert new_id > 49407 and tokens.argmax() < eot
    assert torch.equal(pool_text(context[:1], tokens), context[:1, eot])
    with pytest.raises(ValueError, match="end-of-text"):
        pool_text(context[:1], torch.zeros(1, 77, dtype=torch.long))


def test_vision_model_refuses_pixels_of_another_size():
    """The position table fixes the image size: other sizes are refused, with the preprocessing to use."""
    model = CLIPVisionModel(CLIPVisionConfig.tiny())
    with pytest.raises(ValueError, match=r"preprocess\(images, size=32\)"):
        model(torch.zeros(1, 3, 224, 224))


def test_vision_configs_round_trip_through_json():
    """Every preset survives to_dict -> JSON -> from_dict unchanged."""
    for preset in (CLIPVisionConfig.vit_l14, CLIPVisionConfig.tiny):
        assert CLIPVisionConfig.from_dict(json.loads(json.dumps(preset().to_dict()))) == preset()


# ----------------------------------------------------------------------------------------------------
# Preprocessing, against transformers' CLIPImageProcessor


def _reference_processor(**kwargs):
    """transformers' CLIP image processor on its torchvision path (the default from transformers 5)."""
    processor = transformers.CLIPImageProcessor(**kwargs)
    if getattr(processor, "backend", None) != "torchvision":
        processor = transformers.CLIPImageProcessorFast(**kwargs)       # transformers 4
    return processor


def _picture(height, width, channels, seed):
    """A smooth colour pattern with noise: what a resize filter treats differently from flat colour."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    waves = torch.stack([torch.sin(x / (7 + c) + y / (11 + 2 * c) + c) for c in range(channels)])
    noise = 20 * torch.randn(channels, height, width, generator=generator)
    return (127 + 100 * waves + noise).clamp(0, 255).to(torch.uint8)     # (C, H, W)


def _pil(tensor, mode):
    array = tensor.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if mode == "L" else array, mode)


GENERATED = {
    "300x201": lambda: _pil(_picture(201, 300, 3, 1), "RGB"),
    "201x300": lambda: _pil(_picture(300, 201, 3, 2), "RGB"),
    "224x224": lambda: _pil(_picture(224, 224, 3, 3), "RGB"),
    "17x500": lambda: _pil(_picture(500, 17, 3, 4), "RGB"),
    "227x224 (odd overhang)": lambda: _pil(_picture(224, 227, 3, 5), "RGB"),
    "RGBA": lambda: _pil(_picture(250, 260, 4, 6), "RGBA"),
    "greyscale": lambda: _pil(_picture(260, 250, 1, 7), "L"),
    "palette": lambda: _pil(_picture(240, 320, 3, 8), "RGB").convert("P"),
    "uint8 tensor": lambda: _picture(201, 300, 3, 9),
    "uint8 RGBA tensor": lambda: _picture(300, 201, 4, 10),
    "uint8 greyscale tensor": lambda: _picture(230, 240, 1, 11),
}


@pytest.mark.parametrize("name", list(GENERATED))
def test_preprocess_matches_clip_image_processor(name):
    """Odd sizes, transparency, greyscale, palettes and tensors give transformers' pixels within 1e-5."""
    image = GENERATED[name]()
    expected = _reference_processor()(image, return_tensors="pt").pixel_values
    _assert_close(preprocess(image), expected, name)


def test_preprocess_matches_clip_image_processor_on_cifar_photos():
    """Real photos (CIFAR-10 JPEGs, 32 pixels, so upscaled seven times) give transformers' pixels, as a batch."""
    if not CIFAR_JPG.exists():
        pytest.skip(f"{CIFAR_JPG} is not on this machine")
    photos = []
    with tarfile.open(CIFAR_JPG) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg") and "/train/" in member.name:
                photos.append(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
            if len(photos) == 6:
                break
    expected = _reference_processor()(photos, return_tensors="pt").pixel_values
    _assert_close(preprocess(photos), expected, "CIFAR photos")


def test_preprocess_batches_and_other_sizes():
    """A (B, C, H, W) uint8 batch, at the tiny model's 32 pixels, matches the processor set to 32."""
    batch = torch.stack([_picture(48, 40, 3, seed) for seed in range(3)])
    size = {"shortest_edge": 32}
    processor = _reference_processor(size=size, crop_size={"height": 32, "width": 32})
    expected = processor(list(batch), return_tensors="pt")
    _assert_close(preprocess(batch, size=32), expected.pixel_values, "batch at 32 pixels")
    with pytest.raises(TypeError, match="uint8"):
        preprocess(batch.float())
