"""LoRA files: both layouts merged like diffusers' load_lora_weights + fuse_lora, and one clear error for a
LoRA made for another model."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minildm import convert
from minildm.lora import LCM_LORA_TARGETS
from test_ldm import (SIZE, as_denoisers, assert_close_to_reference, diffusers_parts, load_original, models,  # noqa: F401
                      original_file, reference_pipeline, write_tokenizer_folder)
from test_sample import cli_error, run, workdir  # noqa: F401

RANK, ALPHA = 4, 2.0


def lora_targets(unet, text):
    """(kind, module name, module) of the layers a LoRA trainer adapts, named as diffusers and
    transformers name them: attention and feed-forward layers and the transformers' 1x1 projections."""
    wanted = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    for name, module in unet.named_modules():
        if name.endswith(wanted) and isinstance(module, (nn.Linear, nn.Conv2d)):
            yield "unet", name, module
    for name, module in text.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")) and isinstance(module, nn.Linear):
            yield "text_encoder", "text_model." + name.removeprefix("text_model."), module


def random_lora(unet, text, layout, seed=0):
    """A random LoRA for these diffusers/transformers models in the kohya or the diffusers (PEFT) layout."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for kind, name, module in lora_targets(unet, text):
        w = module.weight
        kernel = tuple(w.shape[2:])
        down = torch.randn(RANK, w.shape[1], *kernel, generator=g) * 0.1
        up = torch.randn(w.shape[0], RANK, *([1] * len(kernel)), generator=g) * 0.1
        if layout == "kohya":
            prefix = ("lora_unet_" if kind == "unet" else "lora_te_") + name.replace(".", "_")
            state.update({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                          f"{prefix}.alpha": torch.tensor(ALPHA)})
        else:
            state.update({f"{kind}.{name}.lora_A.weight": down, f"{kind}.{name}.lora_B.weight": up})
    return state


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_lora_matches_diffusers_fuse_lora(models, original_file, tmp_path, layout):
    """The same LoRA file, merged at scale 0.7, gives the image diffusers gives after load_lora_weights and
    fuse_lora(lora_scale=0.7), and a different image from the model without it."""
    pytest.importorskip("peft")
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path)
    path = tmp_path / f"{layout}.safetensors"
    lora = random_lora(pipe.unet, pipe.text_encoder, layout)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    targets = len(list(lora_targets(pipe.unet, pipe.text_encoder)))  # before peft wraps the layers
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    ours = load_original(original_file)
    as_denoisers(ours.unet, pipe.unet)
    plain = ours.generate("a cat in a hat", num_steps=4, guidance_scale=5.0, seed=2, output_type="latent")
    layers = ours.load_lora(path, 0.7)
    assert layers == targets
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
    z = ours.generate("a cat in a hat", num_steps=4, guidance_scale=5.0, latents=latents, output_type="latent")
    with torch.no_grad():
        z_ref = pipe("a cat in a hat", num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE,
                     latents=latents, output_type="latent").images
    assert_close_to_reference(z, z_ref, layout)
    assert (z - plain).abs().max().item() > 1e-2  # the LoRA does change the image


# The LCM-LoRA's layers and file layout: minildm.lora.LCM_LORA_TARGETS and the comment above it.

LCM_RANK, LCM_ALPHA = 8, 1.0  # alpha / r = 1/8, as the real file's 8 / 64


def lcm_style_lora(diffusers_unet, seed=0):
    """The LCM-LoRA's layers for this diffusers UNet, random, in its file's layout: peft adapts the LCM-LoRA's
    target modules, diffusers' convert_state_dict_to_kohya names them, alpha and float16 as the training
    script saved them. Returns the file's state dict and the adapted diffusers module names."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trainee = UNet2DConditionModel.from_config(diffusers_unet.config)
    trainee.add_adapter(LoraConfig(r=LCM_RANK, lora_alpha=LCM_ALPHA, target_modules=list(LCM_LORA_TARGETS)))
    g = torch.Generator().manual_seed(seed)
    # down ~ 1/sqrt(fan in), up ~ 1/sqrt(r): B A is about as large as the weight, alpha / r an eighth of it
    peft_state = {k: torch.randn(v.shape, generator=g) * v.shape[1:].numel() ** -0.5
                  for k, v in get_peft_model_state_dict(trainee).items()}
    state = convert_state_dict_to_kohya({"unet." + k: v for k, v in peft_state.items()})
    state = {k: (torch.tensor(LCM_ALPHA) if k.endswith(".alpha") else v).half() for k, v in state.items()}
    modules = sorted({k.removesuffix(".lora_A.weight") for k in peft_state if k.endswith(".lora_A.weight")})
    return state, modules


def test_lcm_lora_merges_every_layer_kind_like_diffusers(models, original_file, tmp_path):
    """A LoRA with the LCM-LoRA's layers and layout (convolutions with 3x3 downs, the resnets' time_emb_proj,
    attention, feed-forward, proj_in/out, the samplers' convolutions) changes exactly those weights, each to
    the weight diffusers' load_lora_weights + fuse_lora gives, and the LCM sampler then makes the image the
    LCMScheduler makes."""
    pytest.importorskip("peft")
    from minildm.convert import unet_to_diffusers

    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path, "LCMScheduler")
    state, modules = lcm_style_lora(pipe.unet)
    assert {t for m in modules for t in LCM_LORA_TARGETS if m.endswith("." + t)} == set(LCM_LORA_TARGETS)
    downs = {k.removesuffix(".lora_down.weight"): v for k, v in state.items() if k.endswith(".lora_down.weight")}
    assert {tuple(v.shape[2:]) for v in downs.values()} == {(), (1, 1), (3, 3)}
    assert {tuple(v.shape[2:]) for k, v in state.items() if k.endswith(".lora_up.weight")} == {(), (1, 1)}
    assert any(name.endswith("_time_emb_proj") for name in downs) and len(downs) == len(modules)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))

    ours = load_original(original_file)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(2))
    kw = dict(num_steps=4, guidance_scale=1.5, latents=latents, sampler="lcm", seed=5, output_type="latent")
    as_denoisers(ours.unet, pipe.unet)
    plain = ours.generate("a cat in a hat", **kw)
    assert ours.load_lora(path) == len(modules)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)

    # every adapted weight, and nothing else, changed: each to diffusers' fused weight
    ours_key = unet_to_diffusers({k: k for k in before}, ours.unet.cfg)   # diffusers key -> minildm key
    adapted = {ours_key[m + ".weight"]: m for m in modules}
    after = ours.unet.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(adapted)
    for key, module in adapted.items():
        torch.testing.assert_close(after[key], pipe.unet.get_submodule(module).get_base_layer().weight.detach(),
                                   atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")

    z = ours.generate("a cat in a hat", **kw)
    with torch.no_grad():
        z_ref = pipe("a cat in a hat", num_inference_steps=4, guidance_scale=1.5, height=SIZE, width=SIZE,
                     latents=latents, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert_close_to_reference(z, z_ref, "LCM-LoRA")
    assert (z - plain).abs().max().item() > 1e-2  # the LoRA does change the image


def test_loras_add_up_and_scale_zero_changes_nothing(models, original_file, tmp_path):
    """Merging at scale 0 leaves every weight as it was; two merges at 0.5 equal one at 1."""
    pytest.importorskip("diffusers")
    unet, vae, text, _ = diffusers_parts(models, write_tokenizer_folder(str(tmp_path / "tok")))
    path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in random_lora(unet, text, "kohya").items()}, str(path))
    a, b = load_original(original_file), load_original(original_file)
    before = {k: v.clone() for k, v in a.unet.state_dict().items()}
    a.load_lora(path, 0.0)
    assert all(torch.equal(before[k], v) for k, v in a.unet.state_dict().items())
    a.load_lora(path, 0.5)
    a.load_lora(path, 0.5)
    b.load_lora(path, 1.0)
    for k, v in b.unet.state_dict().items():
        torch.testing.assert_close(a.unet.state_dict()[k], v, atol=1e-6, rtol=0)


def test_lora_for_another_model_is_a_one_line_error(original_file, tmp_path):
    """An SDXL LoRA, a LoRA whose shapes fit another model, unknown layer names, and a file that is no
    LoRA are refused before any weight changes."""
    model = load_original(original_file)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cases = {
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
                  "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)},
                 "SDXL LoRA"),
        "sd2": ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                 torch.zeros(4, 1024),
                 "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
                 torch.zeros(64, 4)}, "made for another model: its .*attn2.to_k.weight delta"),
        "names": ({"lora_unet_middle_block_9_conv.lora_down.weight": torch.zeros(4, 8),
                   "lora_unet_middle_block_9_conv.lora_up.weight": torch.zeros(8, 4)}, "has no counterpart"),
        "model": ({convert.UNET_PREFIX + "out.2.bias": torch.zeros(4)}, "not a LoRA: it is .*Stable Diffusion"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(convert.CheckpointError, match=message):
            model.load_lora(path)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_command_line_lora(workdir, monkeypatch, tmp_path):  # noqa: F811
    """--lora FILE:SCALE merges before sampling and is recorded; a bad scale is a usage error."""
    pytest.importorskip("diffusers")
    from test_convert import tiny_models
    from reference_configs import diffusers_unet_config
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel as HFTextModel
    from reference_configs import transformers_text_config

    unet, _, text = tiny_models()
    d_unet = UNet2DConditionModel(**diffusers_unet_config(unet.cfg))
    d_text = HFTextModel(transformers_text_config(text.cfg))
    save_file({k: v.contiguous() for k, v in random_lora(d_unet, d_text, "kohya").items()},
              str(workdir / "style.safetensors"))
    result = run(workdir, "a cat", "--steps", "2", "--seed", "1", "--out", "lora", "--lora", "style.safetensors:0.5")
    assert result.returncode == 0, result.stderr
    assert "layers merged at scale 0.5" in result.stderr
    message = cli_error(workdir, monkeypatch, "a cat", "--lora", "style.safetensors:strong")
    assert message.startswith("--lora 'style.safetensors:strong': SCALE")


def test_merging_into_bfloat16_weights_matches_merging_in_float32(models, original_file, tmp_path):
    """A model loaded in bfloat16 gets the LoRA added in float32 and rounded once: its weights are the
    float32 merge to within bfloat16's rounding (the weights were rounded once before the merge too)."""
    pytest.importorskip("diffusers")
    unet, _, text, _ = diffusers_parts(models, write_tokenizer_folder(str(tmp_path / "tok")))
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in random_lora(unet, text, "kohya").items()}, str(path))
    merged, changed = {}, 0
    for dtype in (torch.float32, torch.bfloat16):
        model = load_original(original_file, dtype=dtype)
        before = {k: v.clone() for k, v in model.unet.state_dict().items()}
        model.load_lora(path)
        merged[dtype] = model.unet.state_dict()
    for key, w32 in merged[torch.float32].items():
        w16 = merged[torch.bfloat16][key]
        assert w16.dtype == torch.bfloat16
        # two roundings to bfloat16 (8 significant bits) of numbers up to the largest weight's size
        assert (w16.float() - w32).abs().max() <= 2**-7 * w32.abs().max(), key
        changed += not torch.equal(w16, before[key])
    assert changed > 20
