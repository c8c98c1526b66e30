"""Data sets of captioned images: CIFAR-10, a folder of your own images, and generated shapes.

Every data set here is a `CaptionedImages`: all images held in memory as one uint8 tensor at the
training resolution, plus one caption source per image. Small data sets in memory keep the training
loop simple and its data order exactly reproducible (the loop draws batches with its own
`torch.Generator`, see `CaptionedImages.batch`).

    name        meaning
    x           images as float tensors in [-1, 1], shape (B, 3, H, W)
    images      the stored uint8 pixels, shape (N, 3, H, W)
    captions    one string per image (or a class name filled into a random template)
    labels      an integer class per image (-1 when there are no classes); used for held-out splits

Three sources:

    load_cifar10(data_dir=None)      torchvision's pickled batches (archive or folder), or an
                                     ImageFolder tree <class>/<image> (folder or archive);
                                     downloads into data/ if online
    load_folder(data_dir, resolution) your images, captions from captions.jsonl or a .txt beside
                                     each image, else the folder (class) name
    make_shapes(n, resolution, seed)  coloured circles, squares and triangles with captions naming
                                     colour, shape and position; no download, deterministic

`load_dataset(name, ...)` picks one by name, as the training command line does.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

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
    """

    def __init__(self, images, captions, labels=None, templated=False, flip=False,
                 class_names=None, skipped=0, source=""):
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
        return fill_template(TEMPLATES[k // 2], text, fix_article=bool(k % 2))

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
                               source=self.source)

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


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_from_batches(batches) -> tuple:
    """Stack torchvision's pickled CIFAR-10 batches: dicts with b'data' (n, 3072) and b'labels'."""
    data, labels = [], []
    for batch in batches:
        data.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8))
        labels.extend(int(v) for v in batch[b"labels"])
    images = torch.cat([d.reshape(-1, 3, CIFAR_RESOLUTION, CIFAR_RESOLUTION) for d in data]).to(torch.uint8)
    return images, labels


def _load_pickle(f):
    # The CIFAR batches are pickled numpy arrays; they come from the archive the user pointed at.
    return pickle.load(f, encoding="bytes")


CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_pickles(folder: Path, split: str):
    batches = []
    for n in CIFAR_BATCHES[split]:
        with open(folder / n, "rb") as f:
            batches.append(_load_pickle(f))
    return batches


def _cifar_from_archive(path: Path, split: str, max_images: int | None) -> tuple:
    """(images, labels, skipped) from a .tar(.gz), without extracting it: torchvision's
    cifar-10-python.tar.gz, or an archive of an ImageFolder tree <class>/<image>, read as the same tree
    extracted would be (the shallowest folder holding all ten classes, files in name order)."""
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            by_name = {PurePosixPath(m.name).name: m for m in members}
            if "data_batch_1" in by_name or "test_batch" in by_name:
                missing = [n for n in CIFAR_BATCHES[split] if n not in by_name]
                if missing:
                    raise DataError(f"{path} does not look like cifar-10-python.tar.gz (no {missing[0]} inside)")
                batches = [_load_pickle(io.BytesIO(tar.extractfile(by_name[n]).read())) for n in CIFAR_BATCHES[split]]
                return (*_cifar_from_batches(batches), 0)
            files = _imagefolder_members(members)
            if not files:
                raise DataError(f"{path} holds neither cifar-10-python's batches nor a <class>/<image> tree "
                                "with the ten CIFAR-10 classes")
            labels = [CIFAR10_CLASSES.index(PurePosixPath(m.name).parent.name) for m in files]
            if max_images is not None:  # the folder's balanced head, without decoding the rest
                keep = _balanced_indices(labels, max_images)
                files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            pixels = {}
            for i in sorted(range(len(files)), key=lambda i: files[i].offset_data):  # one pass through the file
                raw = tar.extractfile(files[i]).read()
                try:
                    pixels[i] = load_image(io.BytesIO(raw), CIFAR_RESOLUTION)
                except Exception:  # not an image, truncated, unsupported mode: skipped, as in a folder
                    pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} cannot be read as a tar archive ({type(e).__name__}: {first_line})") from None
    if not pixels:
        raise DataError(f"none of the {len(files)} image files in {path} could be read")
    return torch.stack([pixels[i] for i in sorted(pixels)]), [labels[i] for i in sorted(pixels)], len(files) - len(pixels)


def _imagefolder_members(members) -> list:
    """The image files of the shallowest <root>/<class>/<image> tree that has all ten classes."""
    trees = {}
    for m in members:
        p = PurePosixPath(m.name)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.parent.name in CIFAR10_CLASSES:
            trees.setdefault(p.parent.parent, []).append(m)
    complete = [root for root, files in trees.items()
                if {PurePosixPath(m.name).parent.name for m in files} >= set(CIFAR10_CLASSES)]
    if not complete:
        return []
    root = min(complete, key=lambda r: (len(r.parts), r.parts))
    return sorted(trees[root], key=lambda m: PurePosixPath(m.name).parts)


def _find_cifar_source(root: Path):
    """('pickle', batches_folder), ('archive', tar_file) or ('folder', imagefolder_root) under `root`, or None."""
    if root.is_file():
        return ("archive", root) if root.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    candidates = [root]
    for depth in range(3):
        nxt = []
        for d in candidates:
            if (d / "data_batch_1").is_file():
                return "pickle", d
            if (d / "cifar-10-python.tar.gz").is_file():
                return "archive", d / "cifar-10-python.tar.gz"
            subdirs = sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
            if {p.name for p in subdirs} >= set(CIFAR10_CLASSES):
                return "folder", d
            nxt.extend(subdirs)
        candidates = nxt
    return None


def load_cifar10(data_dir: str | None = None, split: str = "train", download_root: str = "data",
                 max_images: int | None = None, download: bool = True) -> CaptionedImages:
    """CIFAR-10 with template captions from its class names.

    `data_dir` may be torchvision's cifar-10-python.tar.gz, the extracted cifar-10-batches-py
    folder (or a folder holding either), or an ImageFolder tree <class>/<image> (e.g. the JPEG
    re-encoding of the training split), as a folder or as a .tar(.gz) read without extracting it.
    Without `data_dir`, `download_root` is searched and, when online, torchvision downloads the data
    set there (unless `download` is False). Offline with nothing local raises `DataError`. `max_images` keeps an equal share of
    each class (at least one), the first ones in file order.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise DataError(f"--data-dir {root} does not exist; {CIFAR_URL_HINT}")
        found = _find_cifar_source(root)
        if found is None:
            raise DataError(f"no CIFAR-10 found in {root}; expected cifar-10-python.tar.gz, "
                            "cifar-10-batches-py/ or an ImageFolder tree <class>/<image>")
    else:
        found = _find_cifar_source(Path(download_root)) if Path(download_root).is_dir() else None
        if found is None and not download:
            raise DataError(f"CIFAR-10 is not in {download_root}/ and downloading is off; {CIFAR_URL_HINT}")
        if found is None:
            found = ("pickle", _download_cifar10(download_root))
    kind, path = found
    if kind == "folder":
        data = load_folder(path, resolution=CIFAR_RESOLUTION, class_names=CIFAR10_CLASSES)
        data.flip = True
    else:
        skipped = 0
        if kind == "archive":
            images, labels, skipped = _cifar_from_archive(path, split, max_images)
            if skipped:
                print(f"data: skipped {skipped} unreadable file(s) in {path}", file=sys.stderr)
        else:
            images, labels = _cifar_from_batches(_cifar_pickles(path, split))
        data = CaptionedImages(images, [CIFAR10_CLASSES[k] for k in labels], labels, templated=True,
                               flip=True, class_names=CIFAR10_CLASSES, skipped=skipped, source=str(path))
    if max_images is not None and max_images < len(data):
        # Keep the classes balanced: take an equal share from each class, in file order.
        data = _balanced_head(data, max_images)
    return data


def _balanced_indices(labels, n: int) -> list:
    """The first n // (number of classes) indices of every class (at least one each), in order."""
    per, taken, keep = max(1, n // len(set(labels))), {}, []
    for i, k in enumerate(labels):
        if taken.get(k, 0) < per:
            taken[k] = taken.get(k, 0) + 1
            keep.append(i)
    return keep


def _balanced_head(data: CaptionedImages, n: int) -> CaptionedImages:
    return data.subset(_balanced_indices(data.labels.tolist(), n))


def _download_cifar10(root: str) -> Path:
    try:
        import torchvision
        torchvision.datasets.CIFAR10(root=root, train=True, download=True)
    except Exception as e:  # offline, DNS failure, proxy, ...
        raise DataError(f"CIFAR-10 is not in {root}/ and could not be downloaded "
                        f"({type(e).__name__}); {CIFAR_URL_HINT}") from None
    return Path(root) / "cifar-10-batches-py"


# ----------------------------------------------------------------------------- your own folder

def _read_caption_file(root: Path) -> dict:
    """captions.jsonl: one JSON object a line with the image's path (relative to the folder) under
    "file_name", "file" or "image", and its caption under "text" or "caption"."""
    table = {}
    path = root / "captions.jsonl"
    if not path.is_file():
        return table
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = next(row[k] for k in ("file_name", "file", "image") if k in row)
            text = next(row[k] for k in ("text", "caption") if k in row)
        except (ValueError, StopIteration, TypeError):
            raise DataError(f"{path}:{line_no}: expected {{\"file_name\": ..., \"text\": ...}}") from None
        table[str(Path(name))] = str(text)
    return table


def load_image(path, resolution: int) -> torch.Tensor:
    """An image file as uint8 (3, R, R): shorter side resized to R, then center-cropped."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.reshape(resolution, resolution, 3).permute(2, 0, 1).contiguous()


def load_folder(data_dir, resolution: int = 32, class_names=None,
                max_images: int | None = None) -> CaptionedImages:
    """Your own images, found recursively under `data_dir`, with captions from (in this order)
    captions.jsonl, a .txt file beside the image with the same stem, or the name of the image's
    folder put into a template (ImageFolder layout). Unreadable files are skipped and counted."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    table = _read_caption_file(root)
    folder_names = sorted({p.parent.name for p in files if p.parent != root})
    if class_names is None:
        class_names = folder_names
    class_index = {c: k for k, c in enumerate(class_names)}

    images, captions, labels, templated, skipped = [], [], [], [], 0
    for p in files[:max_images] if max_images else files:
        rel = str(p.relative_to(root))
        txt = p.with_suffix(".txt")
        if rel in table:
            caption, is_class = table[rel], False
        elif txt.is_file():
            caption, is_class = txt.read_text(encoding="utf-8").strip(), False
        elif p.parent != root:
            caption, is_class = p.parent.name, True
        else:
            caption, is_class = "", False
        try:
            images.append(load_image(p, resolution))
        except Exception:  # truncated, not an image, unsupported mode, ...
            skipped += 1
            continue
        captions.append(caption)
        labels.append(class_index.get(p.parent.name, -1) if p.parent != root else -1)
        templated.append(is_class)
    if not images:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    if skipped:
        print(f"data: skipped {skipped} unreadable file(s) under {root}", file=sys.stderr)
    all_class = all(templated)
    if not all_class:  # mixed sources: write the templated class names out as fixed captions
        captions = [fill_template(TEMPLATES[0], c) if t else c for c, t in zip(captions, templated)]
    return CaptionedImages(torch.stack(images), captions, labels, templated=all_class, flip=False,
                           class_names=class_names if all_class else [], skipped=skipped,
                           source=str(root))


# ----------------------------------------------------------------------------- generated shapes

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


# ----------------------------------------------------------------------------- by name

DATASETS = ("cifar", "folder", "shapes")


def load_dataset(name: str, data_dir: str | None = None, resolution: int = 32,
                 num_images: int | None = None, seed: int = 0) -> CaptionedImages:
    """The data set the training command line asks for by `--dataset`."""
    if name == "cifar":
        data = load_cifar10(data_dir, max_images=num_images)
        if resolution != data.resolution:
            data.images = torch.nn.functional.interpolate(
                data.images.float(), size=resolution, mode="bicubic", align_corners=False
            ).round().clamp(0, 255).to(torch.uint8)
        return data
    if name == "folder":
        if data_dir is None:
            raise DataError("--dataset folder needs --data-dir DIR (a folder of images)")
        return load_folder(data_dir, resolution, max_images=num_images)
    if name == "shapes":
        return make_shapes(num_images or 2000, resolution, seed)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def main(argv=None):
    """Load a data set, print a summary, and optionally save a grid of examples."""
    from .cli import Parser

    parser = Parser(prog="python -m minildm.data", description="Inspect a minildm data set.")
    parser.add_argument("--dataset", choices=DATASETS, default="shapes", help="which data set to load")
    parser.add_argument("--data-dir", default=None, help="local copy of the data (cifar, folder)")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    parser.add_argument("--num-images", type=int, default=None, help="load at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed for generated shapes")
    parser.add_argument("--grid", default=None, help="save a PNG grid of the first 16 images here")
    args = parser.parse_args(argv)
    from .cli import check_int, check_seed, check_writable_dir, fail, usage

    check_int("--resolution", args.resolution, 8, 1024)
    check_int("--num-images", args.num_images, 1)
    check_seed("--seed", args.seed)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    if args.grid:
        check_writable_dir("--grid", os.path.dirname(os.path.abspath(args.grid)))
    try:
        data = load_dataset(args.dataset, args.data_dir, args.resolution, args.num_images, args.seed)
    except DataError as e:
        fail(str(e))
    print(data)
    for i in range(min(5, len(data))):
        print(f"  {i}: {data.caption(i)!r}")
    if args.grid:
        import torchvision
        torchvision.utils.save_image(data.images[:16].float() / 255, args.grid, nrow=4)
        print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
