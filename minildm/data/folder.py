"""Your own images: a folder of <class>/<image>, or images with captions in captions.jsonl or a .txt beside each."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .captioned import TEMPLATES, IMAGE_EXTENSIONS, DataError, fill_template, CaptionedImages


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
