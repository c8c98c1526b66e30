"""CIFAR-10: torchvision's pickled batches (archive or folder) or an ImageFolder tree of JPEGs (folder or
.tar.gz), read without extracting; downloaded into data/ only when online and nothing local is given."""
from __future__ import annotations

import io
import pickle
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import torch

from .captioned import (CIFAR10_CLASSES, CIFAR_RESOLUTION, IMAGE_EXTENSIONS, CIFAR_URL_HINT, DataError,
                        CaptionedImages)
from .folder import load_folder, load_image


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
