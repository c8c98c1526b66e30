"""Reworded training captions (data/wording.py) and the held-out phrasings that evaluation scores with."""
import re

import pytest
import torch

from minildm import data
from minildm.data.wording import SYNONYMS, UNSEEN_PHRASINGS, Wording, noise_words, unseen_phrasings
from minildm.tokenizer import CLIPTokenizer

CLASSES = data.CIFAR10_CLASSES


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default(context_length=32)


@pytest.fixture(scope="module")
def wording(tokenizer):
    return Wording(tokenizer, CLASSES, p=1.0)


def words(text: str) -> list:
    return re.findall(r"[a-z{}\-]+", text.lower())


def test_noise_words_are_the_whole_vocabulary_but_the_class_words(tokenizer, wording):
    """Every whole word of CLIP's vocabulary can be a noise word, except the class names and their
    synonyms, which would teach the wrong class."""
    everything = noise_words(tokenizer)
    assert len(everything) > 34000
    named = set(CLASSES) | {w for ws in SYNONYMS.values() for w in ws}
    assert len(named - set(everything)) <= 1                        # all but "automobiles" are one word of it
    assert not named & set(wording.noise)
    assert len(wording.noise) == len(everything) - len(named & set(everything))


def test_reworded_captions_keep_the_class_and_vary(tokenizer, wording):
    """Drawn from a seeded generator: the class word (or a synonym) is always there but in a few
    captions with no class word at all; lengths and positions vary; everything fits the context."""
    g = torch.Generator().manual_seed(1)
    captions = [wording.reword("horse", g) for _ in range(2000)]
    named = {"horse", *SYNONYMS["horse"]}
    with_class = [c for c in captions if named & set(c.split())]
    assert 0.90 < len(with_class) / len(captions) < 0.99            # no_class = 0.05 of them
    assert sum("horse" in c.split() for c in with_class) / len(with_class) > 0.7      # synonym = 0.2
    positions = {c.split().index("horse") for c in with_class if "horse" in c.split()}
    assert len(positions) > 12                                      # the class word moves about
    assert len({len(c.split()) for c in captions}) > 15             # and the length changes
    assert sum(c == "horse" for c in captions) > 0                  # the bare word is among them
    lengths = [len(tokenizer.encode(c)) for c in captions]
    assert max(lengths) <= tokenizer.context_length - 2             # nothing truncated
    again = torch.Generator().manual_seed(1)
    assert [wording.reword("horse", again) for _ in range(50)] == captions[:50]


def test_only_a_share_of_captions_is_reworded(tokenizer):
    """p of the templated captions are reworded; without a generator (plain indexing) none is."""
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    names = [CLASSES[i % 10] for i in range(40)]
    plain = data.CaptionedImages(images, names, labels=[i % 10 for i in range(40)], templated=True, class_names=CLASSES)
    templates = {data.fill_template(t, c, fix) for t in data.TEMPLATES for c in CLASSES for fix in (True, False)}
    assert plain.caption(3) in templates
    plain.wording = Wording(tokenizer, CLASSES, p=0.5)
    assert plain.caption(3) == data.fill_template(data.TEMPLATES[3], "cat")
    g = torch.Generator().manual_seed(0)
    drawn = [plain.batch(torch.arange(40), g)[1] for _ in range(25)]
    share = sum(c not in templates for batch in drawn for c in batch) / 1000
    assert 0.4 < share < 0.55                                       # a reworded caption may hit a template
    assert plain.subset([0, 1]).wording is plain.wording


def test_the_held_out_phrasings_are_apart_from_training():
    """A few hundred frames, each with one slot; none is a training template or what dropping words of
    one leaves (so a template word's absence is not what makes them new); not the tests' own examples
    ("a cat in a hat", the bare word); none truncated by the 32-position encoder."""
    frames = unseen_phrasings()
    assert len(frames) >= 300 and len(set(frames)) == len(frames)
    template_words = [words(t.replace(" a {}", article)) for t in data.TEMPLATES for article in (" a {}", " an {}")]

    def within(short, long):
        it = iter(long)
        return all(w in it for w in short)

    for frame in frames:
        assert frame.count("{}") == 1
        assert not any(within(words(frame), t) for t in template_words), frame
    assert "a {} in a hat" not in frames and "{}" not in frames
    tokenizer = CLIPTokenizer.default(context_length=32)
    assert max(len(tokenizer.encode(data.fill_template(f, "automobile"))) for f in frames) <= 30
    assert len({len(f.split()) for f in frames}) >= 10              # many lengths
    assert any(f != f.lower() for f in frames) and any(f[-1] in "!?." for f in frames)


def test_held_out_phrasings_are_filled_with_the_right_article():
    assert data.fill_template("a {} in the snow", "airplane") == "an airplane in the snow"
    assert data.fill_template("the {} is small", "cat") == "the cat is small"


def test_a_bad_phrasings_file_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no phrasings"):
        unseen_phrasings(path)
    path.write_text("a {} and a {}\n")
    with pytest.raises(ValueError, match="exactly one"):
        unseen_phrasings(path)
    assert UNSEEN_PHRASINGS.exists()
