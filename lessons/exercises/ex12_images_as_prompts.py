"""Exercises for lesson 12, images as prompts. Check them with:  python -m minildm.check 12

Each is a few lines of PyTorch; the checks run yours beside the package's CLIP (a tiny one with random
weights), joint_space.joint_embedding and the image adapter's training pairs.
"""
import torch


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut pictures (B, C, H, W) into P x P patches, row by row: (B, N, C * P * P), N = (H / P) * (W / P).

    Each patch is flattened the way a convolution's weight (D, C, P, P) is: channel, then row, then
    column. Then `patchify(pixels, P) @ W.flatten(1).T` is exactly the ViT's patch embedding, the
    convolution with kernel and stride P (lesson 12, section 1.1).
    """
    raise NotImplementedError


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's scores s_ij (B_images, B_texts) from image_embeds (B_images, D_p), text_embeds (B_texts, D_p)
    and the learnt logit_scale kappa (a 0-dim tensor, a logarithm): lesson 12, section 1.3.
    """
    raise NotImplementedError


def joint_mix(image_embeds: torch.Tensor, image_weights: list, plus_embeds: torch.Tensor,
              minus_embeds: torch.Tensor, a: float, norm: float | None = None) -> torch.Tensor:
    """The embedding of lesson 12, section 5, shape (D_p,): the weighted sum of the unit image embeddings,
    plus a times each unit caption embedding in plus_embeds (k_plus, D_p), minus a times each in
    minus_embeds (k_minus, D_p, possibly empty); made a unit vector, then given the length `norm`, or
    when norm is None the images' lengths averaged with the weights' absolute values (a plain mean when
    every weight is 0).
    """
    raise NotImplementedError


def decoupled_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, k_image: torch.Tensor,
                        v_image: torch.Tensor, scale: float) -> torch.Tensor:
    """The image adapter's cross-attention before the output projection (lesson 12, section 6): q (B, h, n, d)
    attends to the text's keys and values (B, h, L, d) and, separately, to the image tokens' (B, h, N, d);
    the image part is weighed by `scale`. Returns (B, h, n, d).
    """
    raise NotImplementedError


def class_pairs(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference photo of each training photo for the default pairing (lesson 12, section 6): for photo
    i, the index of another photo of the same class, drawn uniformly with `generator`; photo i itself only
    when it is the only photo of its class. labels (n,) -> indices (n,).
    """
    raise NotImplementedError
