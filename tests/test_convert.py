"""Checkpoint layouts: original SD keys as diffusers' converter expects them, EMA, diffusers folders,
minildm's own files, recognition of other checkpoints, and refusal of pickles that run code."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from minildm import convert
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.schedule import NoiseSchedule
from minildm.unet import UNet, UNetConfig
from minildm.vae import AutoencoderKL, VAEConfig
from reference_configs import diffusers_unet_config, diffusers_vae_config

# A UNet with three levels, two ResBlocks per level and attention on two of them exercises every
# index of the rename maps (downsamplers, upsamplers after attention and without).
UNET_3LEVEL = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                   num_heads=2, transformer_depth=1, context_dim=32, norm_groups=8)


def tiny_configs(unet=None):
    """UNet, VAE and text configs that fit together (context width 32, latent scale 0.5)."""
    vae_cfg = VAEConfig.tiny()
    vae_cfg.scale_factor = 0.5
    return UNetConfig(**(unet or UNET_3LEVEL)), vae_cfg, CLIPTextConfig.tiny()


def tiny_models(seed=0, unet=None):
    """Random tiny models (non-zero everywhere: the zero-initialised layers get random values too)."""
    torch.manual_seed(seed)
    unet_cfg, vae_cfg, text_cfg = tiny_configs(unet)
    models = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
                else:  # norm scales stay near 1, biases near 0
                    p.copy_((p == 1).float() + 0.1 * torch.randn_like(p))
    return [m.eval() for m in models]


def original_state(unet, vae, text, ema_offset=0.01):
    """A flat state dict in the exact layout of a real SD v1 file: the three prefixes, the text
    encoder's position_ids, the DDPM buffers, and EMA copies of the UNet under model_ema.*."""
    state = convert.merge_original(unet.state_dict(), vae.state_dict(), text.state_dict())
    state[convert.TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(text.cfg.context_length)[None]
    schedule = NoiseSchedule.sd()
    state["betas"] = schedule.betas
    state["alphas_cumprod"] = schedule.alphas_cumprod
    state["alphas_cumprod_prev"] = schedule.alphas_cumprod_prev
    state["sqrt_alphas_cumprod"] = schedule.sqrt_alphas_cumprod
    state["posterior_variance"] = schedule.posterior_variance
    if ema_offset is not None:
        for k, v in unet.state_dict().items():
            state[convert.ema_key(k)] = v + ema_offset
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return state


def test_ema_key_is_the_original_naming():
    """EMA names drop "model." and every dot, as CompVis' LitEma stores them."""
    assert convert.ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


@pytest.mark.parametrize("unet", [None, dict(UNET_3LEVEL, attention_levels=(0, 1, 2))])
def test_original_layout_is_what_diffusers_converter_expects(unet):
    """diffusers' single-file converter turns our original-layout dict, EMA included, into its models exactly."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    models = tiny_models(unet=unet)
    state = original_state(*models)
    unet_model, vae, text = models
    d_unet = UNet2DConditionModel(**diffusers_unet_config(unet_model.cfg))
    converted = sfu.convert_ldm_unet_checkpoint(dict(state), d_unet.config, extract_ema=True)
    d_unet.load_state_dict(converted, strict=True)
    ours = convert.unet_to_diffusers({k: v + 0.01 for k, v in unet_model.state_dict().items()}, unet_model.cfg)
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours), "diffusers did not pick the EMA weights"

    d_vae = DiffusersVAE(**diffusers_vae_config(vae.cfg))
    converted = sfu.convert_ldm_vae_checkpoint(dict(state), d_vae.config)
    d_vae.load_state_dict(converted, strict=True)
    ours = convert.vae_to_diffusers(vae.state_dict(), vae.cfg)
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)

    converted = sfu.convert_ldm_clip_checkpoint(dict(state))
    converted.pop("text_model.embeddings.position_ids", None)
    assert converted.keys() == convert.text_to_diffusers(text.state_dict()).keys()


def test_diffusers_maps_round_trip():
    """original -> diffusers -> original gives back every tensor under its own name."""
    unet, vae, text = tiny_models()
    for sd, to, back, cfg in ((unet.state_dict(), convert.unet_to_diffusers, convert.unet_from_diffusers, unet.cfg),
                              (vae.state_dict(), convert.vae_to_diffusers, convert.vae_from_diffusers, vae.cfg)):
        again = back(to(sd, cfg), cfg)
        assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    again = convert.text_from_diffusers(convert.text_to_diffusers(text.state_dict()))
    assert again.keys() == text.state_dict().keys()


def test_old_diffusers_vae_attention_names_are_accepted():
    """VAE folders saved by old diffusers (query/key/value/proj_attn) map to the same weights."""
    _, vae, _ = tiny_models()
    new = convert.vae_to_diffusers(vae.state_dict(), vae.cfg)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for n, o in old_names.items():
            k = k.replace(f"attentions.0.{n}.", f"attentions.0.{o}.")
        old[k] = v
    back = convert.vae_from_diffusers(old, vae.cfg)
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


def test_split_original_uses_every_key_and_prefers_ema():
    """Splitting keeps the buffers aside, picks EMA UNet weights by default and the raw ones when asked."""
    unet, vae, text = tiny_models()
    ckpt = convert.split_original(original_state(unet, vae, text))
    k = "input_blocks.0.0.weight"
    assert torch.equal(ckpt.unet_state()[k], unet.state_dict()[k] + 0.01)
    assert torch.equal(ckpt.unet_state(use_ema=False)[k], unet.state_dict()[k])
    assert ckpt.vae.keys() == vae.state_dict().keys()
    assert ckpt.text_encoder.keys() == text.state_dict().keys()  # position_ids dropped
    assert "alphas_cumprod" in ckpt.buffers


def test_unknown_keys_are_reported_grouped_by_module():
    """A key under no known prefix is an error naming its module, not silently dropped."""
    unet, vae, text = tiny_models()
    state = original_state(unet, vae, text, ema_offset=None)
    state["model.diffusion_model.extra_block.0.weight"] = torch.zeros(1)
    ckpt = convert.split_original(state)  # under the UNet prefix: caught by the strict model check
    with pytest.raises(convert.CheckpointError, match=r"unexpected keys in extra_block"):
        convert.check_state_dict("UNet", unet, ckpt.unet)
    state["something_else.weight"] = torch.zeros(1)
    with pytest.raises(convert.CheckpointError, match=r"something_else"):
        convert.split_original(state)


def test_missing_and_misshaped_keys_are_grouped():
    """Missing keys are counted per module and shape mismatches name the key and both shapes."""
    unet, _, _ = tiny_models()
    state = dict(unet.state_dict())
    removed = [k for k in state if k.startswith("input_blocks.1.")]
    for k in removed:
        del state[k]
    state["out.2.weight"] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(convert.CheckpointError) as info:
        convert.check_state_dict("UNet", unet, state)
    message = str(info.value)
    assert f"missing {len(removed)} keys in input_blocks.1 ({len(removed)})" in message
    assert "out.2.weight (1, 2, 3, 3)" in message


def write_safetensors(path, state, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("kind, keys, words", [
    ("sd2", {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "Stable Diffusion 2.x"),
    ("sd2", {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "1024-wide"),
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
              "model.diffusion_model.out.2.bias": (4,)}, "SDXL"),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
    ("vae", {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.bias": (3,)}, "VAE-only"),
    ("diffusers", {"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers folder"),
])
def test_other_checkpoints_are_named(tmp_path, kind, keys, words):
    """SD 2.x, SDXL, LoRA, VAE-only and diffusers component files are recognised and named, not half-loaded."""
    from minildm.ldm import load_stable_diffusion

    state = {k: torch.zeros(shape) for k, shape in keys.items()}
    assert convert.identify(state) == kind
    path = write_safetensors(tmp_path / "other.safetensors", state)
    with pytest.raises(convert.CheckpointError, match=words):
        load_stable_diffusion(path, device="meta")


def test_truncated_downloads_are_named(tmp_path):
    """A cut-off .safetensors or .ckpt is reported as truncated, not as a key mismatch."""
    unet, vae, text = tiny_models()
    path = write_safetensors(tmp_path / "full.safetensors", original_state(unet, vae, text))
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 100):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(convert.CheckpointError, match="truncated"):
            convert.read_checkpoint(tmp_path / "cut.safetensors")
    torch.save({"state_dict": original_state(unet, vae, text)}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated"):
        convert.read_checkpoint(tmp_path / "cut.ckpt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, legacy):
    """A .ckpt whose pickle calls os.system is refused with a clear message and the command never runs."""
    marker = tmp_path / "marker"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": _RunsCode(marker)}
    path = tmp_path / "evil.ckpt"
    if legacy:
        with open(path, "wb") as f:  # an old-style pickle (no tensors: plain pickle cannot store them safely)
            pickle.dump({"global_step": 1, "x": _RunsCode(marker)}, f, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(convert.CheckpointError, match=r"refusing to load .*system"):
        convert.read_checkpoint(path)
    assert not marker.exists()


def test_ckpt_with_and_without_wrapper_in_float16(tmp_path):
    """.ckpt files with or without the state_dict wrapper load the same float16 tensors."""
    unet, vae, text = tiny_models()
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in original_state(unet, vae, text).items()}
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "wrapped.ckpt")
    torch.save(state, tmp_path / "bare.ckpt")
    a = convert.read_checkpoint(tmp_path / "wrapped.ckpt")
    b = convert.read_checkpoint(tmp_path / "bare.ckpt")
    assert a.kind == b.kind == "sd1"
    assert all(torch.equal(a.unet_state()[k], b.unet_state()[k]) for k in a.unet)
    assert a.vae["decoder.conv_out.weight"].dtype == torch.float16


def test_safetensors_are_memory_mapped(tmp_path):
    """Reading a .safetensors file maps it instead of copying it into memory."""
    path = write_safetensors(tmp_path / "m.safetensors", {"w": torch.randn(64, 64)})
    state, _ = convert.read_safetensors(path)
    ptr = state["w"].data_ptr()
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith("m.safetensors")]
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    assert any(lo <= ptr < hi for lo, hi in spans), "the tensor does not live in a mapping of the file"


def test_save_checkpoint_round_trip(tmp_path):
    """save_checkpoint writes the original layout with the minildm metadata, and reads back equal."""
    unet, vae, text = tiny_models()
    ema = {k: v * 2 for k, v in unet.state_dict().items()}
    path = convert.save_checkpoint(tmp_path / "run" / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                                   ema_unet_state=ema, schedule=NoiseSchedule.sd(), scale_factor=0.25)
    assert os.listdir(tmp_path / "run") == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["minildm"])
        keys = set(f.keys())
    assert meta["format"] == 1 and meta["prediction"] == "eps" and meta["scale_factor"] == 0.25
    assert UNetConfig.from_dict(meta["unet"]) == unet.cfg
    assert "model_ema.diffusion_modelinput_blocks00weight" in keys and "model.diffusion_model.out.2.bias" in keys
    ckpt = convert.load_checkpoint(path)
    assert ckpt.kind == "minildm"
    assert all(torch.equal(ckpt.ema_unet[k], v) for k, v in ema.items())
    assert all(torch.equal(ckpt.vae[k], v) for k, v in vae.state_dict().items())


def test_vae_only_checkpoint(tmp_path):
    """A stage-1 checkpoint holds only the VAE and its config."""
    _, vae, _ = tiny_models()
    path = convert.save_checkpoint(tmp_path / "vae.safetensors", vae=vae, scale_factor=0.3, dtype=torch.float16)
    ckpt = convert.load_checkpoint(path)
    assert ckpt.unet is None and ckpt.text_encoder is None and ckpt.meta["unet"] is None
    assert ckpt.vae["encoder.conv_in.weight"].dtype == torch.float16


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half way leaves the previous checkpoint intact and no temporary file."""
    import safetensors.torch

    unet, vae, text = tiny_models()
    path = convert.save_checkpoint(tmp_path / "model.safetensors", vae=vae)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        convert.save_checkpoint(path, unet=unet, vae=vae, text_encoder=text)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_sd15_key_set_loads_on_meta_device():
    """The full SD v1.5 key set (diffusers' converter agrees) loads strictly into our models on the meta device."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    with torch.device("meta"):
        unet, vae, text = UNet(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd()), CLIPTextModel(CLIPTextConfig.vit_l14())
    state = convert.merge_original(unet.state_dict(), vae.state_dict(), text.state_dict(),
                                   ema_unet=unet.state_dict())
    state[convert.TEXT_PREFIX + "embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long, device="meta")
    state["alphas_cumprod"] = torch.empty(1000, device="meta")
    ckpt = convert.split_original(state)
    with torch.device("meta"):
        d_unet = UNet2DConditionModel(**diffusers_unet_config(UNetConfig.sd15()))
    converted = sfu.convert_ldm_unet_checkpoint(dict(state), d_unet.config, extract_ema=True)
    expected = d_unet.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    for name, cls, cfg, sd in (("UNet", UNet, UNetConfig.sd15(), ckpt.unet_state()),
                               ("VAE", AutoencoderKL, VAEConfig.sd(), ckpt.vae),
                               ("text encoder", CLIPTextModel, CLIPTextConfig.vit_l14(), ckpt.text_encoder)):
        with convert.empty_parameters():
            model = cls(cfg)
        convert.load_module(name, model, sd, device="meta")
    n_unet = sum(v.numel() for v in ckpt.unet.values())
    assert n_unet == 859_520_964


def test_text_keys_without_text_model_are_accepted():
    """Old files store the text encoder under cond_stage_model.transformer.* without "text_model."."""
    unet, vae, text = tiny_models()
    state = original_state(unet, vae, text)
    old = {k.replace(convert.TEXT_PREFIX, "cond_stage_model.transformer."): v for k, v in state.items()}
    ckpt = convert.split_original(old)
    assert all(torch.equal(ckpt.text_encoder[k], v) for k, v in text.state_dict().items())
