"""Generated shapes: coloured circles, squares and triangles whose captions name colour, shape and place;
no download, deterministic, learnable in minutes (lessons 05 and 06 use them)."""
from __future__ import annotations


import torch

from .captioned import CaptionedImages, to_uint8


SHAPE_COLORS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
}
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_POSITIONS = {  # name -> centre as a fraction of the image size (x, y)
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "center": (0.5, 0.5),
}
SHAPE_BACKGROUND = (24, 24, 24)


def shape_caption(color: str, kind: str, position: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {color} {kind} {where}"


def draw_shape(color: str, kind: str, position: str, resolution: int = 32,
               size: float = 0.22, jitter=(0.0, 0.0)) -> torch.Tensor:
    """One shape on a dark background as uint8 (3, R, R); `size` is the half-width as a fraction
    of the image, `jitter` a small (dx, dy) shift of the centre in the same units."""
    r = resolution
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = SHAPE_POSITIONS[position]
    dx, dy = xx - (cx + jitter[0]), yy - (cy + jitter[1])
    if kind == "circle":
        mask = dx ** 2 + dy ** 2 <= size ** 2
    elif kind == "square":
        mask = (dx.abs() <= size * 0.85) & (dy.abs() <= size * 0.85)
    elif kind == "triangle":  # apex up: |dx| shrinks linearly towards the top
        mask = (dy <= size * 0.8) & (dy >= -size) & (dx.abs() <= (dy + size) * 0.6)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {SHAPE_KINDS}")
    bg = torch.tensor(SHAPE_BACKGROUND, dtype=torch.uint8)[:, None, None]
    fg = torch.tensor(SHAPE_COLORS[color], dtype=torch.uint8)[:, None, None]
    return torch.where(mask, fg, bg.expand(3, r, r))


def make_shapes(n: int = 2000, resolution: int = 32, seed: int = 0) -> CaptionedImages:
    """`n` images of one coloured shape each, captioned with its colour, shape and position;
    the same seed gives the same images. Labels are the colour (for held-out splits)."""
    g = torch.Generator().manual_seed(seed)
    colors, kinds, positions = list(SHAPE_COLORS), list(SHAPE_KINDS), list(SHAPE_POSITIONS)
    images, captions, labels = [], [], []
    for _ in range(n):
        c = int(torch.randint(len(colors), (1,), generator=g))
        k = int(torch.randint(len(kinds), (1,), generator=g))
        p = int(torch.randint(len(positions), (1,), generator=g))
        size = 0.16 + 0.1 * float(torch.rand((), generator=g))
        jitter = ((torch.rand(2, generator=g) - 0.5) * 0.08).tolist()
        images.append(draw_shape(colors[c], kinds[k], positions[p], resolution, size, jitter))
        captions.append(shape_caption(colors[c], kinds[k], positions[p]))
        labels.append(c)
    return CaptionedImages(torch.stack(images), captions, labels, templated=False, flip=False,
                           source=f"shapes(seed={seed})")


def dominant_color(x: torch.Tensor, threshold: float = 48.0) -> list:
    """For images x (B, 3, H, W) in [-1, 1]: the palette colour of the shape in each image, or None
    when no pixel stands out from the background.

    Pixels farther than `threshold` (0-255 units) from the background are the shape; their mean
    offset from the background is compared by direction (cosine) with each palette colour's offset,
    so a faint or blurry shape still counts as the colour it leans towards.
    """
    pixels = to_uint8(x).float().permute(0, 2, 3, 1).reshape(len(x), -1, 3)  # (B, H*W, 3)
    bg = torch.tensor(SHAPE_BACKGROUND, dtype=torch.float32)
    offsets = torch.tensor(list(SHAPE_COLORS.values()), dtype=torch.float32) - bg  # (K, 3)
    names = list(SHAPE_COLORS)
    out = []
    for p in pixels:
        fg = p[(p - bg).norm(dim=-1) > threshold]
        if len(fg) == 0:
            out.append(None)
            continue
        direction = (fg - bg).mean(0)
        cos = torch.nn.functional.cosine_similarity(direction[None], offsets, dim=-1)
        out.append(names[int(cos.argmax())])
    return out
