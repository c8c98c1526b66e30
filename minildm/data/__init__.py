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

Class captions are reworded in training (wording.py: template words dropped, noise words from the
whole vocabulary, synonyms) so that a text encoder trained from scratch learns which word is the class;
the held-out phrasings that evaluation checks this with are in unseen_phrasings.txt.

In files: captioned.py (CaptionedImages, captions), wording.py (reworded captions, held-out phrasings),
cifar.py, folder.py, shapes.py (the three sources), sets.py (a data set by name; `python -m minildm.data`).
"""

from .captioned import (CIFAR10_CLASSES, CIFAR_RESOLUTION, TEMPLATES, IMAGE_EXTENSIONS, CIFAR_URL_HINT, DataError, article, class_prompt, fill_template, CaptionedImages, to_float, to_uint8)  # noqa: F401
from .wording import (SYNONYMS, UNSEEN_PHRASINGS, Wording, noise_words, unseen_phrasings)  # noqa: F401
from .folder import (_read_caption_file, load_image, load_folder)  # noqa: F401
from .cifar import (_cifar_from_batches, _load_pickle, CIFAR_BATCHES, _cifar_pickles, _cifar_from_archive, _imagefolder_members, _find_cifar_source, load_cifar10, _balanced_indices, _balanced_head, _download_cifar10)  # noqa: F401
from .shapes import (SHAPE_COLORS, SHAPE_KINDS, SHAPE_POSITIONS, SHAPE_BACKGROUND, shape_caption, draw_shape, make_shapes, dominant_color)  # noqa: F401
from .sets import (DATASETS, load_dataset, main)  # noqa: F401
