"""How a class caption is worded during training, so that a text encoder trained from scratch learns
to read text, not a list of sentences.

CIFAR-10 has ten class names and six templates: sixty captions (a hundred and twenty with both
articles). A text encoder that sees only those learns sixty sentences. Every other token of CLIP's
49,408 keeps its random first embedding, and every position of the context matters, so a prompt with
one unseen word ("a cat in a hat") moves the context further than the class word does, and the model
draws whatever that context happens to be nearest to. The cure is to train on captions in which the
class word is the only thing that always carries the class:

    reworded caption     a training template, each of its other words dropped with probability
                         `drop`, and 0..`max_noise` noise words put in at random places:
                         "photo dr a cat ninja", "cat", "an hawaii image 78 of a frog"
    noise words          whole words drawn uniformly from the tokenizer's vocabulary (not the class
                         words or their synonyms): every embedding gets trained, and every one of
                         them learns to mean "not the class"
    synonyms             a class is sometimes named by another word for it (kitten, puppy, car, boat)
    no class word        a few captions are noise words alone: text without a class word then
                         means what the empty prompt means, any class

`Wording(tokenizer, class_names)` draws one such caption from a class name and a torch.Generator
(so a seeded run rewords identically every time). The phrasings that evaluation uses to check the
result (unseen_phrasings.txt, read by `unseen_phrasings()`) share no frame with the templates, and
their words reach training only as one noise word among 34,000.

Notation: p the probability that a caption is reworded (the rest keep their template as written).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .captioned import TEMPLATES, fill_template

# Other words for each CIFAR-10 class, used in training so that a user's word for it is understood.
# All but "automobiles" are one token of CLIP's vocabulary. They are never noise words.
SYNONYMS = {
    "airplane": ("airplanes", "plane", "planes", "aircraft", "jet"),
    "automobile": ("automobiles", "car", "cars"),
    "bird": ("birds",),
    "cat": ("cats", "kitten", "kitty"),
    "deer": ("fawn", "stag"),
    "dog": ("dogs", "puppy", "doggy"),
    "frog": ("frogs", "toad"),
    "horse": ("horses", "pony"),
    "ship": ("ships", "boat", "boats"),
    "truck": ("trucks", "lorry"),
}

UNSEEN_PHRASINGS = Path(__file__).with_name("unseen_phrasings.txt")


def noise_words(tokenizer, exclude: Sequence[str] = ()) -> list:
    """Every whole word of the tokenizer's vocabulary as text (34,473 for CLIP), but those in `exclude`."""
    excluded = {w.lower() for w in exclude}
    words = []
    for piece, i in sorted(tokenizer.encoder.items(), key=lambda kv: kv[1]):
        if not piece.endswith("</w>") or i in tokenizer.special_tokens:
            continue
        text = tokenizer.decode([i])
        if text and text.lower() not in excluded:
            words.append(text)
    return words


class Wording:
    """Draws reworded captions for class names (see the module's docstring)."""

    def __init__(self, tokenizer, class_names: Sequence[str], p: float = 0.5, drop: float = 0.3,
                 max_noise: int = 16, synonym: float = 0.2, no_class: float = 0.05,
                 templates: Sequence[str] = TEMPLATES):
        if not 0 <= p <= 1:
            raise ValueError(f"the rewording probability must be in [0, 1], not {p}")
        self.p, self.drop, self.max_noise, self.synonym, self.no_class = p, drop, max_noise, synonym, no_class
        self.templates = tuple(templates)
        self.synonyms = {name: SYNONYMS.get(name, ()) for name in class_names}
        named = set(class_names) | {w for words in self.synonyms.values() for w in words}
        self.noise = noise_words(tokenizer, sorted(named))

    def _randint(self, high: int, generator) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    def _chance(self, p: float, generator) -> bool:
        return bool(torch.rand((), generator=generator) < p)

    def noise_word(self, generator) -> str:
        return self.noise[self._randint(len(self.noise), generator)]

    def reword(self, name: str, generator: Optional[torch.Generator]) -> str:
        """One reworded caption for the class `name` (always reworded; see __call__)."""
        noise = [self.noise_word(generator) for _ in range(self._randint(self.max_noise + 1, generator))]
        if self._chance(self.no_class, generator):
            return " ".join(noise or [self.noise_word(generator)])
        synonyms = self.synonyms.get(name, ())
        word = (synonyms[self._randint(len(synonyms), generator)]
                if synonyms and self._chance(self.synonym, generator) else name)
        template = self.templates[self._randint(len(self.templates), generator)]
        words = [w for w in fill_template(template, word).split()
                 if w == word or not self._chance(self.drop, generator)]
        for w in noise:
            words.insert(self._randint(len(words) + 1, generator), w)
        return " ".join(words)

    def __call__(self, template_caption: str, name: str, generator: Optional[torch.Generator]) -> str:
        """`template_caption` as it is with probability 1 - p, else a reworded caption for `name`.
        Without a generator nothing is reworded (plain indexing stays deterministic)."""
        if generator is None or not self._chance(self.p, generator):
            return template_caption
        return self.reword(name, generator)


def unseen_phrasings(path=None) -> list:
    """The held-out phrasings: frames with "{}" where the class word goes, one a line (# comments)."""
    lines = Path(path or UNSEEN_PHRASINGS).read_text(encoding="utf-8").splitlines()
    frames = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not frames:
        raise ValueError(f"{path or UNSEEN_PHRASINGS}: no phrasings in it")
    bad = [f for f in frames if f.count("{}") != 1]
    if bad:
        raise ValueError(f"{path or UNSEEN_PHRASINGS}: each phrasing needs exactly one {{}}, not {bad[0]!r}")
    return frames
