"""The checks of chapter 12 (images as prompts): a picture as patches, CLIP's scores, a mix in the joint space,
the image adapter's decoupled cross-attention and its training pairs."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .compare import Chapter, CheckFailed, compare, unchanged, _gen, _randn


def _tiny_clip(seed: int = 0):
    """A tiny CLIPModel with both towers and random weights (the embeddings' lengths vary from picture to picture)."""
    from ..clip_text import CLIPTextConfig
    from ..clip_vision import CLIPModel, CLIPVisionConfig

    text = CLIPTextConfig.tiny()
    text.context_length = 16
    with torch.random.fork_rng(devices=[]), torch.no_grad():     # the caller's random stream is left alone
        torch.manual_seed(seed)
        model = CLIPModel(CLIPVisionConfig.tiny(), text).eval()
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _pictures(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=_gen(seed), dtype=torch.uint8)


def check_patchify(impl) -> None:
    """patchify(pixels, P) @ W.flatten(1).T equals the ViT's patch embedding (a convolution with kernel and
    stride P) of the same pixels, token by token, for square and oblong pictures."""
    for (B, C, H, W, P, seed) in ((2, 3, 32, 32, 8, 1), (1, 3, 28, 42, 14, 2), (3, 1, 12, 8, 4, 3)):
        pixels = _randn(B, C, H, W, seed=seed)
        conv = torch.nn.Conv2d(C, 5, P, stride=P, bias=False)
        with torch.no_grad():
            conv.weight.copy_(_randn(*conv.weight.shape, seed=seed + 10))
            expected = conv(pixels).flatten(2).transpose(1, 2)                 # (B, N, 5)
        before = {"pixels": pixels.clone()}
        patches = impl.patchify(pixels, P)
        unchanged("patchify", before, {"pixels": pixels})
        n, width = (H // P) * (W // P), C * P * P
        if not torch.is_tensor(patches) or tuple(patches.shape) != (B, n, width):
            shape = tuple(patches.shape) if torch.is_tensor(patches) else type(patches).__name__
            raise CheckFailed(f"patchify(pixels of shape {(B, C, H, W)}, {P}): expected shape {(B, n, width)} "
                              f"(batch, patches row by row, C*P*P numbers each), got {shape}")
        compare(f"patchify(pixels of shape {(B, C, H, W)}, {P}) @ W.flatten(1).T (each patch flattened as the "
                "convolution's weight is: channel, then row, then column)",
                patches @ conv.weight.flatten(1).T, expected, atol=1e-4)


def check_clip_scores(impl) -> None:
    """clip_scores(image_embeds, text_embeds, logit_scale) equals CLIPModel.forward's logits on a tiny CLIP."""
    from ..joint_space import encode_texts
    from ..clip_vision import preprocess
    from ..tokenizer import CLIPTokenizer

    model = _tiny_clip(1)
    pixels = preprocess(list(_pictures(3, 4)), 32)
    captions = ["a photo of a cat", "a dog", "a red car on a road", "sky"]
    tokenizer = CLIPTokenizer.default(context_length=16)
    with torch.no_grad():
        expected = model(pixels, tokenizer(captions))
        image, text = model.encode_image(pixels), encode_texts(captions, model, tokenizer)
    got = impl.clip_scores(image, text, model.logit_scale.detach())
    compare("clip_scores(image_embeds (3, 16), text_embeds (4, 16), logit_scale)", got, expected, atol=1e-4)
    got = impl.clip_scores(3.0 * image, 0.5 * text, model.logit_scale.detach())
    compare("clip_scores(3 * image_embeds, 0.5 * text_embeds, logit_scale): only directions count", got, expected,
            atol=1e-4)


def check_joint_mix(impl) -> None:
    """joint_mix equals joint_space.joint_embedding on a tiny CLIP for several recipes."""
    from ..joint_space import encode_images, encode_texts, joint_embedding
    from ..tokenizer import CLIPTokenizer

    model = _tiny_clip(2)
    tokenizer = CLIPTokenizer.default(context_length=16)
    photos = list(_pictures(3, 5, size=40))
    recipes = [  # (photo indices, image weights, plus, minus, a, norm)
        ([0], None, ["a cat"], ["a dog"], 0.8, None),
        ([0, 1], [0.3, 0.7], [], [], 1.0, None),
        ([2], [0.0], ["a red car"], [], 1.0, None),
        ([0, 1, 2], [1.0, -0.5, 0.25], ["a tree", "at night"], ["a house"], 1.5, None),
        ([1], None, ["a cat"], ["a dog"], 2.0, 7.5),
    ]
    for indices, weights, plus, minus, a, norm in recipes:
        chosen = [photos[i] for i in indices]
        with torch.no_grad():
            expected = joint_embedding(chosen, weights, plus, minus, a, image_encoder=model, text_clip=model,
                                       tokenizer=tokenizer, norm=norm)[0]
            image_embeds = encode_images(chosen, model)
            plus_embeds = encode_texts(plus, model, tokenizer) if plus else torch.zeros(0, image_embeds.shape[1])
            minus_embeds = encode_texts(minus, model, tokenizer) if minus else torch.zeros(0, image_embeds.shape[1])
        w = weights if weights is not None else [1 / len(chosen)] * len(chosen)
        got = impl.joint_mix(image_embeds, w, plus_embeds, minus_embeds, a, norm)
        compare(f"joint_mix({len(chosen)} image(s), weights {w}, plus {plus}, minus {minus}, a={a}, norm={norm})",
                got, expected, atol=1e-4)


def check_decoupled_attention(impl) -> None:
    """decoupled_attention(q, k_text, v_text, k_image, v_image, scale) equals attention over the text plus
    `scale` times attention over the image tokens, each a softmax of its own; scale 0 is the text alone."""
    q, kt, vt = _randn(2, 4, 6, 8, seed=60), _randn(2, 4, 5, 8, seed=61), _randn(2, 4, 5, 8, seed=62)
    ki, vi = _randn(2, 4, 9, 8, seed=63), _randn(2, 4, 9, 8, seed=64)
    text = F.scaled_dot_product_attention(q, kt, vt)
    image = F.scaled_dot_product_attention(q, ki, vi)
    for scale in (1.0, 0.5, 0.0):
        got = impl.decoupled_attention(q, kt, vt, ki, vi, scale)
        compare(f"decoupled_attention(q (2, 4, 6, 8), 5 text tokens, 9 image tokens, scale={scale})", got,
                text + scale * image, atol=1e-5)
    joint = F.scaled_dot_product_attention(q, torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
    if (impl.decoupled_attention(q, kt, vt, ki, vi, 1.0) - joint).abs().max() < 1e-3:
        raise CheckFailed("decoupled_attention equals one softmax over text and image tokens together: the two "
                          "must each have their own softmax (then the image cannot crowd out the text)")


def check_class_pairs(impl) -> None:
    """class_pairs(labels, generator): for each photo another photo of its class (itself only when it is its
    class's only photo), drawn at random: different pairs from different generators, and over many draws more
    than one partner per photo."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    draws = []
    for seed in range(20):
        refs = impl.class_pairs(labels.clone(), _gen(seed))
        refs = torch.as_tensor(refs)
        if refs.shape != labels.shape:
            raise CheckFailed(f"class_pairs(labels of shape {tuple(labels.shape)}): expected one index per photo, "
                              f"got shape {tuple(refs.shape)}")
        if not torch.equal(labels[refs], labels):
            bad = int((labels[refs] != labels).nonzero()[0])
            raise CheckFailed(f"class_pairs: photo {bad} (class {int(labels[bad])}) is paired with photo "
                              f"{int(refs[bad])} of class {int(labels[refs[bad]])}")
        alone = labels == 2
        if (refs == torch.arange(len(labels)))[~alone].any():
            bad = int(((refs == torch.arange(len(labels))) & ~alone).nonzero()[0])
            raise CheckFailed(f"class_pairs: photo {bad} is paired with itself, but its class has other photos "
                              "(a photo as its own prompt teaches the adapter to copy)")
        draws.append(refs)
    draws = torch.stack(draws)
    if all(torch.equal(d, draws[0]) for d in draws):
        raise CheckFailed("class_pairs gives the same pairs for every generator: draw them with the generator")
    partners = [len(set(draws[:, i].tolist())) for i in range(len(labels)) if labels[i] == 3]
    if min(partners) < 2:
        raise CheckFailed("class_pairs: a photo of a class with four photos always gets the same partner in 20 "
                          "draws; pick among all the other photos of its class")


def reference_12():
    from ..finetune import reference_rows
    from ..joint_space import unit

    def patchify(pixels, P):
        return F.unfold(pixels, P, stride=P).transpose(1, 2)

    def clip_scores(image_embeds, text_embeds, logit_scale):
        return logit_scale.exp() * unit(image_embeds) @ unit(text_embeds).T

    def joint_mix(image_embeds, image_weights, plus_embeds, minus_embeds, a, norm=None):
        w = torch.tensor(image_weights, dtype=image_embeds.dtype)
        e = (w[:, None] * unit(image_embeds)).sum(0) + a * unit(plus_embeds).sum(0) - a * unit(minus_embeds).sum(0)
        share = w.abs() if w.abs().sum() > 0 else torch.ones_like(w)
        length = norm if norm is not None else (share * image_embeds.norm(dim=-1)).sum() / share.sum()
        return unit(e) * length

    def decoupled_attention(q, k_text, v_text, k_image, v_image, scale):
        return F.scaled_dot_product_attention(q, k_text, v_text) + scale * F.scaled_dot_product_attention(
            q, k_image, v_image)

    def class_pairs(labels, generator):
        return reference_rows(torch.arange(len(labels)), labels, "class", generator)

    return SimpleNamespace(patchify=patchify, clip_scores=clip_scores, joint_mix=joint_mix,
                           decoupled_attention=decoupled_attention, class_pairs=class_pairs)


CHAPTER_12 = Chapter("12", "12_images_as_prompts", "images as prompts",
                     {"patchify": check_patchify, "clip_scores": check_clip_scores, "joint_mix": check_joint_mix,
                      "decoupled_attention": check_decoupled_attention, "class_pairs": check_class_pairs},
                     reference_12)
