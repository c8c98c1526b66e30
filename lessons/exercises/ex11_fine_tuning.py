"""Exercises for lesson 11, fine-tuning. Check them with:  python -m minildm.check 11

(Lesson 07's file asks for `lora_merge`, W + m (alpha / r) B A itself.) The checks run these beside
`finetune.add_lora`, the textual-inversion hook of `finetune.NewWord`, and `finetune.black_and_white`.
"""
import torch


def lora_numbers(shapes: list, rank: int) -> int:
    """How many numbers a rank-`rank` LoRA trains on layers whose weights have these shapes: (out, in) for a
    linear layer, (out, in, kh, kw) for a convolution (lesson 11, section 1: A is r x in, or a convolution
    into r channels with the layer's kernel; B is out x r, or a 1x1 convolution)."""
    raise NotImplementedError


def new_word_rows(table: torch.Tensor, tokens: torch.Tensor, first_new_id: int, vectors: torch.Tensor) -> torch.Tensor:
    """The token vectors (B, L, D) the text encoder reads while a new word trains (lesson 11, section 2): ids
    below first_new_id are rows of the frozen `table` (V, D); id first_new_id + k is row k of the trainable
    `vectors` (n, D), so that the gradient reaches `vectors`. tokens (B, L) of ids."""
    raise NotImplementedError


def black_and_white(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (B, 3, H, W) in grey, still 3 channels and uint8: the ITU-R 601 luma
    0.299 R + 0.587 G + 0.114 B, rounded to the nearest whole number (lesson 11, section 3)."""
    raise NotImplementedError
