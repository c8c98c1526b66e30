"""Captioned images in memory, and the captions themselves: what every data set here is made of."""
from __future__ import annotations


import torch


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR_RESOLUTION = 32

# Class names become sentences, so that the text encoder learns from prompts, not ids. Only words
# that are true of every image: an adjective like "dark" or "blurry" that the picture does not show
# teaches the model nothing and blurs what the caption means. Each is drawn with "a" and with the
# right article in turn, so both "a photo of an airplane" and "a photo of a airplane" are prompts
# the model knows.
TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a {}",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

CIFAR_URL_HINT = ("connect to the internet so torchvision can download CIFAR-10 into data/, or pass "
                  "--data-dir with cifar-10-python.tar.gz, its extracted cifar-10-batches-py folder, "
                  "or an ImageFolder tree <class>/<image> (a folder or a .tar.gz of one)")


class DataError(RuntimeError):
    """A data set could not be found or read; the message says how to fix it (one line)."""


def article(word: str) -> str:
    """`a` or `an` for a word, for templates that read naturally ("an airplane")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def class_prompt(name: str) -> str:
    """The prompt a user would type: "a photo of a cat", "a photo of an airplane"."""
    return f"a photo of {article(name)} {name}"


def fill_template(template: str, name: str, fix_article: bool = True) -> str:
    """A template with a class name filled in, fixing the article: "a photo of an airplane"."""
    text = template.format(name)
    if not fix_article:
        return text
    if text.startswith(f"a {name}"):
        return f"{article(name)} {name}" + text[len(f"a {name}"):]
    return text.replace(f" a {name}", f" {article(name)} {name}", 1)


class CaptionedImages:
    """Images in memory with a caption per image.

    `images` (N, 3, H, W) uint8. Each image has either a fixed caption (`captions[i]` a string and
    `class_names` ignored) or, when `templated` is True, a class name `captions[i]` that is put into
    a template chosen at random each time the image is drawn. `labels` (N,) long, -1 for none.
    `flip` allows horizontal flips as augmentation (not for captions that name left and right).
    `wording` (a data.wording.Wording, or None) rewords a share of the templated captions drawn with a
    generator, so that a text encoder learns which word carries the class.
    """

    def __init__(self, images, captions, labels=None, templated=False, flip=False,
                 class_names=None, skipped=0, source="", wording=None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images = images
        self.captions = list(captions)
        self.labels = (torch.full((len(images),), -1, dtype=torch.long) if labels is None
                       else torch.as_tensor(labels, dtype=torch.long))
        self.templated = templated
        self.flip = flip
        self.class_names = list(class_names) if class_names is not None else []
        self.skipped = skipped  # unreadable files left out while loading
        self.source = source
        self.wording = wording

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def caption(self, i: int, generator: torch.Generator | None = None) -> str:
        """The caption of image i; for class names, a template drawn with `generator`
        (without one, a fixed template per image, so plain indexing is deterministic)."""
        text = self.captions[i]
        if not self.templated:
            return text
        if generator is None:
            return fill_template(TEMPLATES[i % len(TEMPLATES)], text)
        k = int(torch.randint(2 * len(TEMPLATES), (1,), generator=generator))
        caption = fill_template(TEMPLATES[k // 2], text, fix_article=bool(k % 2))
        return caption if self.wording is None else self.wording(caption, text, generator)

    def __getitem__(self, i: int):
        """(x (3, H, W) float in [-1, 1], caption)."""
        return to_float(self.images[i]), self.caption(i)

    def batch(self, indices, generator: torch.Generator | None = None):
        """A batch (x (B, 3, H, W) in [-1, 1], list of B captions); random flips and templates
        are drawn from `generator`, so a seeded generator gives the same batch every time."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = to_float(self.images[indices])
        if self.flip:
            flips = torch.rand(len(indices), generator=generator) < 0.5
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        captions = [self.caption(int(i), generator) for i in indices]
        return x, captions

    def subset(self, indices) -> "CaptionedImages":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return CaptionedImages(self.images[indices], [self.captions[int(i)] for i in indices],
                               self.labels[indices], self.templated, self.flip, self.class_names,
                               source=self.source, wording=self.wording)

    def split(self, holdout_per_class: int):
        """(train, held_out): the last `holdout_per_class` images of every class are held out
        (images without a class count as one class), so a model can be scored on images it never saw."""
        if holdout_per_class <= 0:
            return self, self.subset([])
        held = torch.zeros(len(self), dtype=torch.bool)
        for label in self.labels.unique():
            where = (self.labels == label).nonzero().flatten()
            held[where[-holdout_per_class:]] = True
        return self.subset((~held).nonzero().flatten()), self.subset(held.nonzero().flatten())

    def prompts(self, n: int = 10) -> list:
        """Fixed prompts that suit this data set, for sample grids: one per class when there are classes."""
        if self.class_names:
            return [fill_template(TEMPLATES[0], c) for c in self.class_names[:n]]
        seen = []
        for i in range(len(self)):
            text = self.caption(i)
            if text and text not in seen:
                seen.append(text)
            if len(seen) == n:
                break
        return seen

    def __repr__(self) -> str:
        return (f"CaptionedImages({len(self)} images at {self.resolution}px, "
                f"{len(self.class_names)} classes, source={self.source!r}, skipped={self.skipped})")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 pixels (clamped)."""
    return x.detach().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
