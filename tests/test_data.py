"""Data sets: CIFAR-10 in its three local forms, a folder of captioned images, generated shapes."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import data


def _fake_cifar_batches(folder, per_batch=6):
    """torchvision's cifar-10-batches-py layout with a few random images per batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar_pickled_folder_and_archive_agree(tmp_path):
    """The extracted batches folder and the .tar.gz archive give the same images, labels and captions."""
    folder = _fake_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    a = data.load_cifar10(str(folder))
    b = data.load_cifar10(str(archive))
    c = data.load_cifar10(str(tmp_path))  # the folder that holds them is found too
    assert len(a) == 30 and a.images.shape == (30, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.images, c.images)
    head_a, head_b = data.load_cifar10(str(folder), max_images=10), data.load_cifar10(str(archive), max_images=10)
    assert len(head_b) < 30 and torch.equal(head_a.images, head_b.images)  # max_images holds for archives too
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    # Rows are stored channel-major (R plane, G plane, B plane), as torchvision reads them.
    assert torch.equal(a.images[0].flatten(), torch.as_tensor(first[b"data"][0]))
    label = data.CIFAR10_CLASSES[first[b"labels"][0]]
    assert label in a.caption(0) and a.caption(0).startswith(("a ", "an "))


def test_cifar_imagefolder_tree(tmp_path):
    """An ImageFolder tree <class>/<file> below the given folder loads with class captions."""
    root = tmp_path / "cifar10" / "train"
    for k, name in enumerate(data.CIFAR10_CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (32, 32), (k * 20, j * 100, 7)).save(root / name / f"{j:04d}.jpg")
    d = data.load_cifar10(str(tmp_path))
    assert len(d) == 20 and d.labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert "airplane" in d.caption(0) and "truck" in d.caption(19)
    train, held = d.split(holdout_per_class=1)
    assert len(train) == 10 and len(held) == 10 and held.labels.tolist() == list(range(10))


def _imagefolder_tree(root, per_class=3, splits=("train",)):
    """cifar10/<split>/<class>/NNNN.png files of distinct colours under root."""
    for s, split in enumerate(splits):
        for k, name in enumerate(data.CIFAR10_CLASSES):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (32, 32), (k * 20, j * 60, 7 + 100 * s)).save(folder / f"{j:04d}.png")


def _shuffled_archive(root, archive, extra=()):
    """A .tar.gz of every file under root, stored in a shuffled order (tarfile.add would sort them)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    with tarfile.open(archive, "w:gz") as tar:
        for i in order:
            tar.add(files[i], arcname=str(files[i].relative_to(root)))
        for name, raw in extra:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return archive


def test_cifar_imagefolder_archive_matches_folder(tmp_path):
    """A .tar.gz of an ImageFolder tree, stored in any order, loads without extraction exactly as the
    extracted folder does, and max_images keeps the same balanced head of each class."""
    _imagefolder_tree(tmp_path / "tree")
    archive = _shuffled_archive(tmp_path / "tree", tmp_path / "cifar10-train.tar.gz")
    folder, packed = data.load_cifar10(str(tmp_path / "tree")), data.load_cifar10(str(archive))
    assert len(packed) == 30 and torch.equal(packed.images, folder.images)
    assert packed.labels.tolist() == folder.labels.tolist() == [k for k in range(10) for _ in range(3)]
    assert packed.caption(0) == folder.caption(0) and packed.flip
    head, head_folder = data.load_cifar10(str(archive), max_images=20), data.load_cifar10(str(tmp_path / "tree"), max_images=20)
    assert torch.equal(head.images, head_folder.images) and head.labels.tolist() == [k for k in range(10) for _ in range(2)]


def test_cifar_archive_picks_the_same_tree_and_skips_unreadable_files(tmp_path):
    """With train/ and test/ trees side by side the archive reads the one the folder reader picks, and
    a file that is not an image (an AppleDouble ._ file) is skipped and counted, not fatal."""
    _imagefolder_tree(tmp_path / "tree", per_class=2, splits=("train", "test"))
    archive = _shuffled_archive(tmp_path / "tree", tmp_path / "both.tar.gz",
                                extra=[("cifar10/train/cat/._0000.png", b"not a png")])
    folder, packed = data.load_cifar10(str(tmp_path / "tree")), data.load_cifar10(str(archive))
    assert len(folder) == len(packed) == 20 and torch.equal(packed.images, folder.images)
    assert packed.skipped == 0
    archive = _shuffled_archive(tmp_path / "tree" / "cifar10" / "train", tmp_path / "one.tar.gz",
                                extra=[("cat/._0000.png", b"not a png")])
    packed = data.load_cifar10(str(archive))
    assert len(packed) == 20 and packed.skipped == 1


def test_archive_without_cifar_is_a_clear_error(tmp_path):
    """An archive with neither CIFAR batches nor all ten class folders, a broken archive, or a file that
    is no archive at all, gives a one-line DataError."""
    (tmp_path / "readme.txt").write_text("hello")
    other = tmp_path / "notes.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    nine = tmp_path / "nine.tar.gz"
    with tarfile.open(nine, "w:gz") as tar:
        for name in data.CIFAR10_CLASSES[:9]:
            tar.add(tmp_path / "readme.txt", arcname=f"{name}/0000.png")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(other.read_bytes()[:20])
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    for path, words in ((other, "neither"), (nine, "neither"), (broken, "cannot be read"), (empty, "cannot be read")):
        with pytest.raises(data.DataError) as e:
            data.load_cifar10(str(path))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_offline_without_data_says_both_fixes(tmp_path, monkeypatch):
    """With no local copy and no network, the error is one line naming both ways to fix it."""
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(None, download_root=str(tmp_path / "data"))
    message = str(e.value)
    assert "\n" not in message and "--data-dir" in message and "internet" in message


def test_folder_captions_sources_and_unreadable_files(tmp_path):
    """captions.jsonl wins over a .txt beside the image, and unreadable files are skipped and counted."""
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 80), (0, 255, 0)).save(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("a green field\n")
    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red wall"}) + "\n")
    d = data.load_folder(tmp_path, resolution=16)
    assert len(d) == 2 and d.skipped == 1 and d.images.shape == (2, 3, 16, 16)
    assert [d.caption(0), d.caption(1)] == ["a red wall", "a green field"]
    assert d.images[0, 0].float().mean() > 250 and d.images[1, 1].float().mean() > 250


def test_center_crop_keeps_the_middle(tmp_path):
    """A wide image is resized on its short side and cropped to its centre."""
    im = Image.new("RGB", (96, 32), (0, 0, 255))
    im.paste((255, 255, 255), (32, 0, 64, 32))  # a white middle third
    im.save(tmp_path / "wide.png")
    x = data.load_image(tmp_path / "wide.png", 16)
    assert x.shape == (3, 16, 16) and x.float().mean() > 240


def test_shapes_are_deterministic_and_captions_match_pixels():
    """The same seed gives the same shapes, and each caption's colour is the image's dominant colour."""
    a, b = data.make_shapes(40, 32, seed=3), data.make_shapes(40, 32, seed=3)
    c = data.make_shapes(40, 32, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    x, captions = a.batch(range(40))
    found = data.dominant_color(x)
    assert all(f"a {color} " in cap for color, cap in zip(found, captions))


def test_batches_are_reproducible_from_a_generator():
    """Flips and caption templates come from the generator: the same seed gives the same batch."""
    d = data.CaptionedImages(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8),
                             ["cat"] * 8, templated=True, flip=True, class_names=["cat"])
    x1, c1 = d.batch([0, 3, 5], torch.Generator().manual_seed(1))
    x2, c2 = d.batch([0, 3, 5], torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2) and c1 == c2 and all("cat" in c for c in c1)
    assert x1.min() >= -1 and x1.max() <= 1
    assert len({d.caption(0, torch.Generator().manual_seed(s)) for s in range(20)}) > 3


def test_download_off_never_calls_torchvision(tmp_path, monkeypatch):
    """With download=False and nothing local, the error comes at once and nothing is fetched."""
    import torchvision

    def fetch(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fetch)
    with pytest.raises(data.DataError, match="downloading is off"):
        data.load_cifar10(None, download_root=str(tmp_path / "data"), download=False)


def test_captions_say_only_what_every_image_shows_with_both_articles():
    """CIFAR captions: no adjective the image may not show; "a photo of a cat" is common; an airplane is
    drawn as both "an airplane" and "a airplane" (what people type)."""
    d = data.CaptionedImages(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["airplane", "cat"], [0, 3],
                             templated=True, class_names=["airplane", "cat"])
    g = torch.Generator().manual_seed(0)
    planes = [d.caption(0, g) for _ in range(600)]
    cats = [d.caption(1, g) for _ in range(600)]
    assert "a photo of an airplane" in planes and "a photo of a airplane" in planes and "an airplane" in planes
    assert 50 < cats.count("a photo of a cat") < 200
    for word in ("blurry", "dark", "bright", "low resolution", "pixelated", "small", "good", "cropped"):
        assert not any(word in c for c in planes + cats), word
    assert d.prompts() == ["a photo of an airplane", "a photo of a cat"]
