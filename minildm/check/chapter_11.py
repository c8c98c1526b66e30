"""The checks of chapter 11 (fine-tuning): how many numbers a LoRA trains, a new word's row in the token
table, and the black-and-white photos of the worked example."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .compare import Chapter, CheckFailed, compare, unchanged, _gen, _randn


def _fresh_tiny_ldm():
    """A LatentDiffusion of tiny random models, new each call (add_lora changes the model it is given)."""
    from ..clip_text import CLIPTextConfig, CLIPTextModel
    from ..ldm import LatentDiffusion
    from ..tokenizer import CLIPTokenizer
    from ..unet import UNet, UNetConfig
    from ..vae import AutoencoderKL, VAEConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LatentDiffusion(UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()),
                               CLIPTextModel(CLIPTextConfig.tiny()), CLIPTokenizer.default(context_length=16))


def check_lora_numbers(impl) -> None:
    """lora_numbers(shapes, rank) equals the numbers finetune.add_lora makes trainable on a tiny model, for the
    attention layers and for every layer the LCM-LoRA adapts (convolutions included), at several ranks."""
    from ..finetune import add_lora

    for targets, text_encoder in (("attention", False), ("attention", True), ("all", False)):
        for rank in (1, 4, 16):
            adapters = add_lora(_fresh_tiny_ldm(), rank=rank, targets=targets, text_encoder=text_encoder)
            shapes = [tuple(d.up.shape[:1]) + tuple(d.down.shape[1:]) for d in adapters.values()]
            expected = sum(p.numel() for d in adapters.values() for p in (d.down, d.up))
            got = impl.lora_numbers(shapes, rank)
            if got != expected:
                kinds = "/".join(str(k) for k in sorted({len(s) for s in shapes}))
                raise CheckFailed(f"lora_numbers({len(shapes)} weight shapes of {kinds}-dimensional weights, e.g. "
                                  f"{shapes[0]} and {shapes[-1]}, rank={rank}): expected {expected}, got {got}")


def check_new_word_rows(impl) -> None:
    """new_word_rows(table, tokens, first_new_id, vectors) reads old ids from the frozen table and new ids from
    `vectors`, and the gradient of the result reaches `vectors` (each row as often as its id is used) and
    nothing else."""
    table = _randn(20, 6, seed=70)                          # ids 0..16 old, 17..19 the new word's three vectors
    vectors = _randn(3, 6, seed=71).requires_grad_(True)
    tokens = torch.tensor([[0, 17, 5, 18, 19, 19], [3, 3, 17, 2, 1, 0]])
    before = {"table": table.clone(), "tokens": tokens.clone()}
    got = impl.new_word_rows(table, tokens, 17, vectors)
    unchanged("new_word_rows", before, {"table": table, "tokens": tokens})
    expected = F.embedding(tokens, torch.cat([table[:17], vectors.detach()]))
    compare("new_word_rows(table (20, 6), tokens (2, 6) with ids 17-19 new, 17, vectors (3, 6))", got, expected)
    if not got.requires_grad:
        raise CheckFailed("new_word_rows: the result does not depend on `vectors` for autograd (no gradient "
                          "would reach the new word); index `vectors` itself, not a copy")
    got.sum().backward()
    counts = torch.tensor([2.0, 1.0, 2.0])[:, None].expand(-1, 6)     # id 17 twice, 18 once, 19 twice
    compare("the gradient of new_word_rows(...).sum() with respect to vectors", vectors.grad, counts)


def check_black_and_white(impl) -> None:
    """black_and_white(uint8 images) equals finetune.black_and_white: ITU-R 601 luma, rounded, in all 3 channels."""
    from ..finetune import black_and_white

    images = torch.randint(0, 256, (4, 3, 8, 8), generator=_gen(72), dtype=torch.uint8)
    before = {"images": images.clone()}
    got = impl.black_and_white(images)
    unchanged("black_and_white", before, {"images": images})
    expected = black_and_white(images)
    if not torch.is_tensor(got) or got.dtype != torch.uint8:
        raise CheckFailed(f"black_and_white: expected uint8 images, got "
                          f"{got.dtype if torch.is_tensor(got) else type(got).__name__}")
    compare("black_and_white(uint8 images (4, 3, 8, 8)), as numbers 0-255", got.float(), expected.float(), atol=0)


def reference_11():
    from ..finetune import black_and_white

    def lora_numbers(shapes, rank):
        return sum(rank * (out + torch.Size(rest).numel()) for out, *rest in shapes)

    def new_word_rows(table, tokens, first_new_id, vectors):
        new = tokens >= first_new_id
        rows = vectors[(tokens - first_new_id).clamp(0, len(vectors) - 1)]
        return torch.where(new[..., None], rows, table[tokens.clamp(max=first_new_id - 1)])

    return SimpleNamespace(lora_numbers=lora_numbers, new_word_rows=new_word_rows, black_and_white=black_and_white)


CHAPTER_11 = Chapter("11", "11_fine_tuning", "fine-tuning",
                     {"lora_numbers": check_lora_numbers, "new_word_rows": check_new_word_rows,
                      "black_and_white": check_black_and_white}, reference_11)
