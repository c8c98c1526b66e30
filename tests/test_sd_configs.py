"""The SD v1 presets, every field, against independent readings of the original configuration.

Shapes alone cannot catch a wrong head count, GroupNorm group count or schedule: a checkpoint loads
strictly with any of them. So each preset field is compared with what diffusers reads from the original
`v1-inference.yaml` (written out below as the original repository ships it), or with the text encoder's
config of `openai/clip-vit-large-patch14`. The correspondence of names is written out in each test,
and each test first checks that it covers every field of the dataclass, so a new field cannot pass
unchecked.
"""
import dataclasses

import pytest

from minildm.clip_text import CLIPTextConfig
from minildm.unet import UNetConfig
from minildm.vae import VAEConfig

# configs/stable-diffusion/v1-inference.yaml of the original Stable Diffusion repository, as a dict
# (the training-only entries, such as the learning-rate scheduler, left out).
V1_INFERENCE = {"model": {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
                "use_checkpoint": True, "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    },
}}

# text_config of openai/clip-vit-large-patch14's config.json (the text tower SD v1 uses)
CLIP_L14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-05}


def field_names(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_unet_preset_matches_diffusers_reading_of_the_yaml():
    """Every UNetConfig field of the SD v1 preset is the one diffusers reads from v1-inference.yaml."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    d = sfu.create_unet_diffusers_config_from_ldm(V1_INFERENCE, {})
    ours = UNetConfig()
    widths = d["block_out_channels"]
    expected = {
        "in_channels": d["in_channels"],
        "out_channels": d["out_channels"],
        "model_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": d["layers_per_block"],
        "attention_levels": tuple(i for i, kind in enumerate(d["down_block_types"]) if kind.startswith("CrossAttn")),
        "num_heads": d["attention_head_dim"],  # for SD v1 diffusers keeps the head count under this name
        "transformer_depth": d["transformer_layers_per_block"],
        "context_dim": d["cross_attention_dim"],
        "norm_groups": 32,  # UNet2DConditionModel's norm_num_groups, which the reading leaves at its default
        "dropout": 0.0,  # inference: no dropout
        "num_classes": d.get("num_class_embeds"),
        "pooled_context": d["class_embed_type"] is not None,
        "guidance_embed_dim": d.get("time_cond_proj_dim"),  # SD v1 has no guidance input (only LCMs do)
    }
    assert set(expected) == field_names(UNetConfig)
    assert d["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert not d["use_linear_projection"]  # SD v1's transformers project with 1x1 convolutions
    for name, value in expected.items():
        assert getattr(ours, name) == value, f"UNetConfig.{name}: {getattr(ours, name)!r}, the YAML says {value!r}"


def test_vae_preset_matches_diffusers_reading_of_the_yaml():
    """Every VAEConfig field of VAEConfig.sd() is the one diffusers reads from v1-inference.yaml."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    d = sfu.create_vae_diffusers_config_from_ldm(V1_INFERENCE, {})
    widths = d["block_out_channels"]
    expected = {
        "in_channels": d["in_channels"],
        "base_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": d["layers_per_block"],
        "z_channels": d["latent_channels"],
        "norm_groups": 32,  # AutoencoderKL's norm_num_groups default; the original hard-codes 32
        "dropout": V1_INFERENCE["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["dropout"],
        "scale_factor": d["scaling_factor"],
    }
    assert set(expected) == field_names(VAEConfig)
    assert d["out_channels"] == d["in_channels"]
    ours = VAEConfig.sd()
    for name, value in expected.items():
        assert getattr(ours, name) == value, f"VAEConfig.{name}: {getattr(ours, name)!r}, the YAML says {value!r}"


def test_text_encoder_preset_matches_clip_vit_l14():
    """Every CLIPTextConfig field of the ViT-L/14 preset is the published text config's."""
    expected = {
        "vocab_size": CLIP_L14_TEXT["vocab_size"],
        "context_length": CLIP_L14_TEXT["max_position_embeddings"],
        "width": CLIP_L14_TEXT["hidden_size"],
        "num_layers": CLIP_L14_TEXT["num_hidden_layers"],
        "num_heads": CLIP_L14_TEXT["num_attention_heads"],
        "mlp_width": CLIP_L14_TEXT["intermediate_size"],
        "layer_norm_eps": CLIP_L14_TEXT["layer_norm_eps"],
    }
    assert set(expected) == field_names(CLIPTextConfig)
    ours = CLIPTextConfig.vit_l14()
    for name, value in expected.items():
        assert getattr(ours, name) == value, f"CLIPTextConfig.{name}: {getattr(ours, name)!r}, CLIP says {value!r}"



# configs/stable-diffusion/v1-inference.yaml as the original repository ships it, as text: its comments,
# flow lists with spaces, a block list, `1.e-6` (which YAML 1.1 reads as a string, not a number) and the
# training-only learning-rate scheduler are all part of what --config must read.
V1_INFERENCE_TEXT = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_the_real_v1_inference_yaml_text_reads_as_the_presets(tmp_path):
    """--config reads the original v1-inference.yaml text (not a dict the tests wrote) into SD v1's sizes:
    every UNet and VAE field it names equals the preset's, and diffusers' own reading of the same text
    (its single-file converter's config builders) agrees on the UNet and VAE; the tests above compare the
    presets with diffusers field by field."""
    import yaml
    from diffusers.loaders import single_file_utils as sfu

    from minildm.convert import read_inference_yaml
    from minildm.schedule import NoiseSchedule

    path = tmp_path / "v1-inference.yaml"
    path.write_text(V1_INFERENCE_TEXT)
    parsed = yaml.safe_load(V1_INFERENCE_TEXT)
    parsed["model"]["params"].pop("scheduler_config")
    assert parsed["model"]["params"] == V1_INFERENCE["model"]["params"]   # the dict above is this text
    read = read_inference_yaml(path)
    unet, vae = UNetConfig.sd15(), VAEConfig.sd()
    for name, value in read["unet"].items():
        assert getattr(unet, name) == value, f"UNet {name}: YAML {value!r}, preset {getattr(unet, name)!r}"
    for name, value in read["vae"].items():
        assert getattr(vae, name) == value, f"VAE {name}: YAML {value!r}, preset {getattr(vae, name)!r}"
    assert read["scale_factor"] == vae.scale_factor == 0.18215
    steps, start, end = read["schedule"]
    sd = NoiseSchedule.sd()
    assert steps == sd.num_timesteps and (start, end) == (sd.params["beta_start"], sd.params["beta_end"])
    theirs = sfu.create_unet_diffusers_config_from_ldm(yaml.safe_load(V1_INFERENCE_TEXT), {}, image_size=512)
    assert tuple(theirs["block_out_channels"]) == tuple(read["unet"]["model_channels"] * m for m in read["unet"]["channel_mult"])
    assert theirs["cross_attention_dim"] == read["unet"]["context_dim"] and theirs["layers_per_block"] == 2
    assert theirs["attention_head_dim"] == read["unet"]["num_heads"]   # diffusers' name for SD v1's head count
    vae_theirs = sfu.create_vae_diffusers_config_from_ldm(yaml.safe_load(V1_INFERENCE_TEXT), {}, image_size=512)
    assert tuple(vae_theirs["block_out_channels"]) == tuple(read["vae"]["base_channels"] * m for m in read["vae"]["channel_mult"])
    assert vae_theirs["latent_channels"] == read["vae"]["z_channels"] and vae_theirs["scaling_factor"] == 0.18215


def test_the_inpainting_models_yaml_text_reads_as_diffusers_reads_it(tmp_path):
    """The SD v1.5 inpainting model's v1-inpainting-inference.yaml (its text as published: a 9-channel UNet,
    conditioning_key hybrid, no use_ema line) reads into the sizes diffusers' converter reads from it."""
    import yaml
    from diffusers.loaders import single_file_utils as sfu

    from minildm.convert import read_inference_yaml

    text = (V1_INFERENCE_TEXT
            .replace("  base_learning_rate: 1.0e-04\n  target: ldm.models.diffusion.ddpm.LatentDiffusion",
                     "  base_learning_rate: 7.5e-05\n  target: ldm.models.diffusion.ddpm.LatentInpaintDiffusion")
            .replace("    conditioning_key: crossattn\n", "    conditioning_key: hybrid   # important\n")
            .replace("    use_ema: False\n", "")
            .replace("        warm_up_steps: [ 10000 ]\n",
                     "        warm_up_steps: [ 2500 ] # NOTE for resuming. use 10000 if starting from scratch\n")
            .replace("        in_channels: 4\n", "        in_channels: 9  # 4 data + 4 downscaled image + 1 mask\n"))
    assert text.count("in_channels: 9") == 1 and "hybrid" in text and "use_ema" not in text
    path = tmp_path / "v1-inpainting-inference.yaml"
    path.write_text(text)
    read = read_inference_yaml(path)
    theirs = sfu.create_unet_diffusers_config_from_ldm(yaml.safe_load(text), {}, image_size=512)
    assert read["unet"]["in_channels"] == theirs["in_channels"] == 9
    assert read["unet"]["out_channels"] == theirs["out_channels"] == 4
    assert tuple(theirs["block_out_channels"]) == tuple(read["unet"]["model_channels"] * m
                                                         for m in read["unet"]["channel_mult"])
    assert theirs["attention_head_dim"] == read["unet"]["num_heads"] == 8
    assert read["scale_factor"] == 0.18215
