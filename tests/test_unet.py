"""The UNet: parity with diffusers through the original checkpoint layout, the SD v1.5 layout, options."""
import os

import pytest
import torch

from minildm.convert import UNET_PREFIX, add_prefix
from minildm.unet import UNet, UNetConfig, timestep_embedding

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments that describe the same network as `cfg`."""
    levels = range(len(cfg.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)]
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=down, up_block_types=up,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,          # diffusers' name for SD v1's head count
        transformer_layers_per_block=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        num_class_embeds=cfg.num_classes,
        flip_sin_to_cos=True, freq_shift=0,       # the original's timestep embedding
    )


def to_diffusers(state_dict, dcfg):
    """minildm weights -> original checkpoint layout -> diffusers layout, with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    return convert_ldm_unet_checkpoint(add_prefix(state_dict, UNET_PREFIX), dcfg)


def randomize(model, generator):
    """Random weights everywhere (the original zero-initialises some output convolutions)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


PARITY_CONFIGS = {
    # Attention skipped at one level, depth 2, a width change at every level, three levels.
    "three_levels": UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                               num_res_blocks=2, attention_levels=(0, 1), num_heads=2,
                               transformer_depth=2, context_dim=24, norm_groups=8),
    # No attention at full resolution (upsample at position 1 and 2), class labels, 3 in / 5 out.
    "classes": UNetConfig(in_channels=3, out_channels=5, model_channels=16, channel_mult=(1, 2, 3),
                          num_res_blocks=1, attention_levels=(1, 2), num_heads=4, transformer_depth=1,
                          context_dim=8, norm_groups=4, num_classes=10),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_matches_diffusers_through_original_layout(name):
    """Same random weights, moved via the original SD key layout, give diffusers' eps within 1e-5."""
    from diffusers import UNet2DConditionModel
    cfg = PARITY_CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    ours = randomize(UNet(cfg), g).eval()
    dcfg = diffusers_config(cfg)
    theirs = UNet2DConditionModel(**dcfg).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), dcfg), strict=True)

    B, L = 3, 7
    z_t = torch.randn(B, cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([0.0, 417.5, 999.0])
    context = torch.randn(B, L, cfg.context_dim, generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g) if cfg.num_classes else None
    with torch.no_grad():
        eps_ours = ours(z_t, t, context, y=y)
        eps_theirs = theirs(z_t, t, context, class_labels=y).sample
        eps_other_context = ours(z_t, t, torch.randn(B, L, cfg.context_dim, generator=g), y=y)
    diff = (eps_ours - eps_theirs).abs()
    # Guard against a vacuous pass: the outputs are not tiny and the context changes them.
    assert eps_theirs.abs().mean() > 0.01 and (eps_ours - eps_other_context).abs().max() > 1e-3
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


# The UNet section of the original SD v1 inference config (v1-inference.yaml), as diffusers reads it.
SD_V1_ORIGINAL_CONFIG = {"model": {"params": {
    "unet_config": {"params": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                                   attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                                   num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                                   context_dim=768, use_checkpoint=True, legacy=False)},
    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def test_sd15_layout_is_exactly_what_diffusers_expects():
    """sd15() has 859,520,964 parameters and exactly the keys and shapes of a real SD v1.5 UNet."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    dcfg = create_unet_diffusers_config_from_ldm(SD_V1_ORIGINAL_CONFIG, {})   # diffusers' own reading
    with torch.device("meta"):
        ours = UNet(UNetConfig.sd15())
        theirs = UNet2DConditionModel(**dcfg)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert sum(p.numel() for p in theirs.parameters()) == 859_520_964

    source = ours.state_dict()
    converted = to_diffusers(source, dcfg)
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert got.keys() == expected.keys(), (
        f"missing {sorted(expected.keys() - got.keys())[:10]}, unexpected {sorted(got.keys() - expected.keys())[:10]}")
    wrong = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert not wrong, f"shape mismatches: {list(wrong.items())[:10]}"
    # The converter copies tensors by reference: every source tensor must appear exactly once.
    source_ids = [id(v) for v in source.values()]
    used_ids = [id(v) for v in converted.values()]
    assert None not in converted.values(), "the converter looked up keys that do not exist"
    assert sorted(used_ids) == sorted(source_ids), (
        f"{len(set(source_ids) - set(used_ids))} source tensors unused, "
        f"{len(used_ids) - len(set(used_ids))} used twice")


def test_timestep_embedding_matches_diffusers():
    """Cosines first, frequencies 10000^(-i/half): diffusers' flip_sin_to_cos=True, shift 0, also for fractional t."""
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 12.25, 999.0])
    ours = timestep_embedding(t, 320)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    diff = (ours - theirs).abs()
    assert diff.max() <= 1e-6, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"
    assert torch.equal(ours[0, :160], torch.ones(160)) and torch.equal(ours[0, 160:], torch.zeros(160))


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(batch):
    """eps_pred has z_t's shape for batch 1 and an odd batch, also with non-square latents."""
    cfg = UNetConfig.tiny()
    model = UNet(cfg).eval()
    z_t = torch.randn(batch, cfg.in_channels, 8, 12)
    with torch.no_grad():
        eps = model(z_t, torch.full((batch,), 5.0), torch.randn(batch, 5, cfg.context_dim))
    assert eps.shape == z_t.shape


def test_scalar_and_tensor_timesteps_agree():
    """A scalar t (int, float or 0-d tensor) means that t for every batch element."""
    cfg = UNetConfig.tiny()
    model = randomize(UNet(cfg), torch.Generator().manual_seed(2)).eval()
    z_t, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, cfg.context_dim)
    with torch.no_grad():
        ref = model(z_t, torch.tensor([250.0, 250.0]), context)
        for t in (250, 250.0, torch.tensor(250)):
            assert torch.equal(model(z_t, t, context), ref)
        assert not torch.allclose(model(z_t, 250.5, context), ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass leaves loss and gradients unchanged."""
    cfg = UNetConfig.tiny()
    model = randomize(UNet(cfg), torch.Generator().manual_seed(3))
    z_t, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 5, cfg.context_dim)

    def grads():
        model.zero_grad()
        loss = model(z_t, t, context).pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_ref, g_ref = grads()
    model.enable_gradient_checkpointing(True)
    loss_ckpt, g_ckpt = grads()
    assert torch.allclose(loss_ref, loss_ckpt, rtol=0, atol=1e-6)
    worst = max((a - b).abs().max().item() for a, b in zip(g_ref, g_ckpt))
    assert worst <= 1e-5, f"max abs gradient difference {worst:.3e}"


def test_attention_slicing_gives_the_same_output():
    """Attending a few query positions at a time changes memory, not the result."""
    cfg = UNetConfig.tiny()
    model = randomize(UNet(cfg), torch.Generator().manual_seed(4)).eval()
    z_t, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, cfg.context_dim)
    with torch.no_grad():
        ref = model(z_t, 500, context)
        model.set_attention_slicing(7)      # does not divide 64 or 16 positions
        sliced = model(z_t, 500, context)
        model.set_attention_slicing(None)
        again = model(z_t, 500, context)
    diff = (ref - sliced).abs()
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"
    assert torch.equal(ref, again)


def test_record_hook_gives_cross_attention_weights():
    """`record` receives (B, nh, h*w, L) weights summing to 1 over tokens, and the output is unchanged."""
    cfg = UNetConfig.tiny()
    model = randomize(UNet(cfg), torch.Generator().manual_seed(5)).eval()
    B, L, h, w = 2, 5, 8, 12
    z_t, context = torch.randn(B, 4, h, w), torch.randn(B, L, cfg.context_dim)
    with torch.no_grad():
        ref = model(z_t, 100, context)
        seen = {}
        modules = model.cross_attention_modules()
        for m in modules.values():
            m.record = lambda name, weights: seen.setdefault(name, weights)
        out = model(z_t, 100, context)
    assert seen.keys() == modules.keys() and "input_blocks.1.1.transformer_blocks.0.attn2" in seen
    for name, weights in seen.items():
        assert weights.shape[:2] == (B, cfg.num_heads) and weights.shape[3] == L, name
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5), name
    assert seen["input_blocks.1.1.transformer_blocks.0.attn2"].shape[2] == h * w
    diff = (ref - out).abs()
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"


def test_config_round_trips_through_a_dict():
    """to_dict() is JSON-serialisable and from_dict() rebuilds an equal config."""
    import json
    for cfg in (UNetConfig.sd15(), UNetConfig.cifar(), UNetConfig.tiny(), PARITY_CONFIGS["classes"]):
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_state_dict_has_no_buffers():
    """The UNet holds parameters only, so its state dict is exactly the checkpoint's tensors."""
    model = UNet(UNetConfig.tiny())
    assert len(model.state_dict()) == len(list(model.parameters()))


def test_pooled_context_matches_diffusers_simple_projection():
    """`pooled_context` adds Linear(context[:, -1]) to the time embedding: diffusers' UNet with
    class_embed_type="simple_projection" fed the last context token as its class input computes the same."""
    from diffusers import UNet2DConditionModel
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=24, norm_groups=8, pooled_context=True)
    g = torch.Generator().manual_seed(3)
    ours = randomize(UNet(cfg), g).eval()
    dcfg = dict(diffusers_config(cfg), class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=cfg.context_dim)
    theirs = UNet2DConditionModel(**dcfg).eval()
    state = ours.state_dict()
    converted = to_diffusers({k: v for k, v in state.items() if not k.startswith("context_emb.")}, dcfg)
    converted.update({"class_embedding.weight": state["context_emb.weight"],
                      "class_embedding.bias": state["context_emb.bias"]})
    theirs.load_state_dict(converted, strict=True)
    z_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3.0, 700.0])
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    with torch.no_grad():
        eps_ours = ours(z_t, t, context)
        eps_theirs = theirs(z_t, t, context, class_labels=context[:, -1]).sample
        last_changed = context.clone()
        last_changed[:, -1] += 1.0
        eps_last = ours(z_t, t, last_changed)
    assert (eps_ours - eps_theirs).abs().max() <= 1e-5
    assert (eps_ours - eps_last).abs().max() > 1e-3


def test_pooled_context_reaches_the_resblocks_without_cross_attention():
    """With every cross-attention silenced, the caption still steers a pooled-context UNet (through
    the time embedding) and no longer steers a plain one; SD v1 stays plain, its layout untouched."""
    outputs = {}
    for pooled in (False, True):
        cfg = UNetConfig.tiny()
        cfg.pooled_context = pooled
        model = randomize(UNet(cfg), torch.Generator().manual_seed(0)).eval()
        with torch.no_grad():
            for name, attn in model.cross_attention_modules().items():
                attn.to_v.weight.zero_()
        z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        a, b = (torch.randn(2, 77, cfg.context_dim, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
        with torch.no_grad():
            outputs[pooled] = (model(z_t, 10, a) - model(z_t, 10, b)).abs().max().item()
    assert outputs[False] < 1e-6 and outputs[True] > 1e-3
    assert not UNetConfig.sd15().pooled_context
    assert not any(k.startswith("context_emb") for k in UNet(UNetConfig.tiny()).state_dict())
