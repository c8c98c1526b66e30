"""The CLIP text encoder: parity with transformers' CLIPTextModel and the real checkpoint layout."""
import json

import pytest
import torch

from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.convert import TEXT_PREFIX, add_prefix

VIT_L14_PARAMETERS = 123_060_480


def _hf_config(cfg):
    """transformers' CLIPTextConfig with the same sizes (CLIP's activation is QuickGELU)."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _text_model(ref):
    """transformers' text transformer: the model itself from transformers 5.6 on, .text_model before."""
    return getattr(ref, "text_model", ref)


def _randomize(model, generator):
    """Weights far from the initialisation, so attention patterns and layer norms matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def _as_checkpoint(model):
    """The model's weights as a real SD v1 checkpoint stores them (with the position_ids buffer)."""
    ckpt = add_prefix(model.state_dict(), TEXT_PREFIX)
    ckpt[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(model.cfg.context_length)[None]
    return ckpt


def test_matches_transformers_clip_text_model(tmp_path):
    """Through the original key layout and diffusers' single-file loader, outputs equal transformers'."""
    transformers = pytest.importorskip("transformers")
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = CLIPTextConfig(width=48, num_layers=3, num_heads=4, mlp_width=96)
    ours = CLIPTextModel(cfg).eval()
    _randomize(ours, torch.Generator().manual_seed(1))

    _hf_config(cfg).save_pretrained(tmp_path)
    ref = single_file_utils.create_diffusers_clip_model_from_ldm(
        transformers.CLIPTextModel, _as_checkpoint(ours), config=str(tmp_path), local_files_only=True
    ).eval()
    # The loader fills parameters non-strictly; make sure every one came from our checkpoint.
    ours_sd = ours.state_dict()
    for key, value in _text_model(ref).state_dict().items():
        assert torch.equal(value, ours_sd[key]), f"{key} was not loaded from the checkpoint"

    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.context_length), generator=generator)
    tokens[:, 0] = 49406
    tokens[0, 10:] = 49407  # a short prompt padded with the end token
    with torch.no_grad():
        context = ours(tokens)
        expected = ref(input_ids=tokens).last_hidden_state
    diff = (context - expected).abs()
    assert context.shape == (3, cfg.context_length, cfg.width)
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_shorter_sequences_match_transformers():
    """Fewer than 77 tokens give the same context as transformers (positions start at 0)."""
    transformers = pytest.importorskip("transformers")
    cfg = CLIPTextConfig.tiny()
    ours = CLIPTextModel(cfg).eval()
    _randomize(ours, torch.Generator().manual_seed(3))
    ref = transformers.CLIPTextModel(_hf_config(cfg)).eval()
    _text_model(ref).load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (ours(tokens) - ref(input_ids=tokens).last_hidden_state).abs()
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_vit_l14_parameter_count_and_checkpoint_keys():
    """vit_l14() has 123,060,480 parameters and exactly the keys and shapes of an SD v1 checkpoint."""
    transformers = pytest.importorskip("transformers")
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = CLIPTextConfig.vit_l14()
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
        ref = transformers.CLIPTextModel(_hf_config(cfg))
    assert sum(p.numel() for p in ours.parameters()) == VIT_L14_PARAMETERS
    assert not [name for name, _ in ours.named_buffers()], "no buffers: position_ids is not ours"

    # What a real checkpoint holds: transformers' weights under the original prefix, plus the
    # position_ids buffer that transformers no longer saves but SD v1 files carry.
    ref_keys = _text_model(ref).state_dict()
    expected = {TEXT_PREFIX + k: tuple(v.shape) for k, v in ref_keys.items()}
    expected[TEXT_PREFIX + "embeddings.position_ids"] = (1, cfg.context_length)
    ckpt = _as_checkpoint(ours)
    got = {k: tuple(v.shape) for k, v in ckpt.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    wrong = [k for k in expected if expected[k] != got[k]]
    assert not wrong, f"shape mismatch: {[(k, got[k], expected[k]) for k in wrong[:5]]}"

    # diffusers recognises the file as SD v1's CLIP and maps every key onto transformers' model.
    assert single_file_utils.is_clip_model(ckpt)
    converted = single_file_utils.convert_ldm_clip_checkpoint(ckpt)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    converted.pop("embeddings.position_ids")
    assert set(converted) == set(ref_keys)


def test_causal_context_ignores_later_tokens():
    """Position i of the context depends only on tokens 0..i (the padding cannot change the prompt)."""
    model = CLIPTextModel(CLIPTextConfig.tiny()).eval()
    _randomize(model, torch.Generator().manual_seed(5))
    tokens = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(6))
    other = tokens.clone()
    other[0, 20:] = 49407
    with torch.no_grad():
        a, b = model(tokens), model(other)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)


def test_config_round_trips_through_json():
    """Every preset survives to_dict -> JSON -> from_dict unchanged."""
    for preset in (CLIPTextConfig.vit_l14, CLIPTextConfig.small, CLIPTextConfig.tiny):
        cfg = preset()
        assert CLIPTextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_preset_sizes_come_from_the_config():
    """A non-standard config builds a model whose output has the configured width and length."""
    cfg = CLIPTextConfig(vocab_size=100, context_length=12, width=24, num_layers=1, num_heads=3, mlp_width=40)
    model = CLIPTextModel(cfg)
    out = model(torch.randint(0, 100, (2, 12)))
    assert out.shape == (2, 12, 24)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 13, dtype=torch.long))
