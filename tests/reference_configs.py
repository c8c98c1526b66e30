"""Configs of the reference models (diffusers, transformers) for minildm's configs, built without minildm's
own config mapping: a model is described as the original repository's inference YAML would describe it,
and diffusers reads that YAML with its own single-file code. Only what the YAML cannot say (GroupNorm
groups, which the original code fixes at 32 and the tiny test models lower) is set here by name.
"""


def original_yaml(unet=None, vae=None) -> dict:
    """The parts of an original v1-inference.yaml that describe this UNetConfig and VAEConfig."""
    params = {}
    if unet is not None:
        params["unet_config"] = {"params": {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": unet.model_channels, "channel_mult": list(unet.channel_mult),
            "num_res_blocks": unet.num_res_blocks,
            # the original names attention places by their downsampling rate: 1, 2, 4, ...
            "attention_resolutions": [2**level for level in unet.attention_levels],
            "num_heads": unet.num_heads, "use_spatial_transformer": True,
            "transformer_depth": unet.transformer_depth, "context_dim": unet.context_dim, "legacy": False,
        }}
    if vae is not None:
        params["first_stage_config"] = {"params": {"embed_dim": vae.z_channels, "ddconfig": {
            "double_z": True, "z_channels": vae.z_channels, "resolution": 256, "in_channels": vae.in_channels,
            "out_ch": vae.in_channels, "ch": vae.base_channels, "ch_mult": list(vae.channel_mult),
            "num_res_blocks": vae.num_res_blocks, "attn_resolutions": [], "dropout": vae.dropout,
        }}, }
        params["scale_factor"] = vae.scale_factor
    else:  # the UNet reading looks up the VAE's downsampling for the sample size only
        params["first_stage_config"] = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    return {"model": {"params": params}}


def diffusers_unet_config(unet) -> dict:
    """UNet2DConditionModel's config for this UNetConfig, as diffusers reads the original YAML."""
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_unet_diffusers_config_from_ldm(original_yaml(unet=unet), {})
    return {**config, "norm_num_groups": unet.norm_groups}


def diffusers_vae_config(vae) -> dict:
    """diffusers' AutoencoderKL config for this VAEConfig, as diffusers reads the original YAML."""
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_vae_diffusers_config_from_ldm(original_yaml(vae=vae), {})
    return {**config, "norm_num_groups": vae.norm_groups}


def transformers_text_config(text):
    """transformers' CLIPTextConfig for this CLIPTextConfig (the fields of CLIP's own config.json)."""
    from transformers import CLIPTextConfig as HFTextConfig

    return HFTextConfig(vocab_size=text.vocab_size, max_position_embeddings=text.context_length,
                        hidden_size=text.width, num_hidden_layers=text.num_layers,
                        num_attention_heads=text.num_heads, intermediate_size=text.mlp_width,
                        hidden_act="quick_gelu", layer_norm_eps=text.layer_norm_eps,
                        bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as SD v1.5's text_encoder/config.json
