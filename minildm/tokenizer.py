"""The CLIP byte-pair-encoding tokenizer: text -> tokens, exactly as Stable Diffusion v1 saw them.

A prompt becomes a row of 77 integers in five steps (lessons/04_text_encoder.md walks through them):

    1. clean_text       ftfy repairs the text (mojibake, ligatures, full-width letters, curly quotes),
                        runs of whitespace become one space, everything is lower-cased
    2. CLIP_PATTERN     a regex cuts the text into words: runs of letters, single digits, runs of
                        punctuation, and the English contractions 's 't 're 've 'm 'll 'd
    3. byte table       each word's UTF-8 bytes are spelled with 256 printable characters
                        (bytes_to_unicode), so any string at all can be tokenized
    4. BPE              the word starts as single characters (the last one marked with "</w>") and
                        the highest-ranked adjacent pair is merged until no known pair is left
    5. __call__         <|startoftext|>, at most 75 word pieces, <|endoftext|>, then padding with
                        <|endoftext|> (id 49407) up to 77 positions

Notation and shapes:

    tokens   LongTensor (B, L) of vocabulary ids, L = context_length = 77
    sot/eot  the start and end tokens <|startoftext|> = 49406 and <|endoftext|> = 49407
    B        number of prompts

The vocabulary (49,408 entries) is the one CLIP was trained with: 512 byte symbols (each alone and
with "</w>"), 48,894 merges in rank order, and the two special tokens. It comes either from the
`bpe_simple_vocab_16e6.txt.gz` file the `clip` package ships (`CLIPTokenizer.default()`) or from a
Hugging Face style folder with vocab.json and merges.txt (`CLIPTokenizer.from_folder()`).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from typing import Iterable, Sequence

import ftfy
import regex
import torch

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
# The clip file holds more merges than CLIP used: it keeps the first 49152 - 256 - 2 = 48,894, which
# with the 512 byte symbols and the 2 special tokens gives the 49,408 ids of the vocabulary.
NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer. `\p{L}` is any letter, `\p{N}` any digit: words keep all their letters,
# numbers are cut into single digits, punctuation runs stay together.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """The 256 bytes as 256 printable characters (GPT-2's table, reused by CLIP).

    Printable Latin-1 bytes stand for themselves; the 68 others (control codes, space, ...) are
    mapped to the characters from U+0100 on, in byte order, after them. BPE then works on strings without
    ever meeting a space or a control character, yet every byte sequence round-trips.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # in this order (printable bytes first): it is the order of the first 256 ids


def clean_text(text: str) -> str:
    """Repair, collapse whitespace, lower-case: the text normalisation of SD v1's tokenizer.

    This is what the tokenizer Stable Diffusion v1 was trained with did (transformers' Python
    CLIPTokenizer with ftfy installed). The `clip` package additionally unescapes HTML entities
    twice, and the fast Rust tokenizer skips ftfy; both change some prompts (see the lesson).
    """
    text = ftfy.fix_text(text)
    return _WHITESPACE.sub(" ", text).strip().lower()


def clip_vocab_file() -> str:
    """Path of the BPE file shipped by the `clip` package, found without importing the package."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the `clip` package (pip install clip-anytorch) provides the CLIP vocabulary file "
            "bpe_simple_vocab_16e6.txt.gz; install it or use CLIPTokenizer.from_folder(path)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz is missing from the installed `clip` package")


def merge_pair(symbols: tuple, pair: tuple) -> tuple:
    """`symbols` with every occurrence of the adjacent `pair` merged into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == tuple(pair):
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def bpe_steps(symbols: tuple, bpe_ranks: dict) -> list:
    """Every state of byte-pair encoding from `symbols` (a word's characters, the last one ending in
    </w>): merge the adjacent pair with the lowest rank, until no adjacent pair has a rank."""
    symbols = tuple(symbols)
    steps = [symbols]
    while len(symbols) > 1:
        pairs = set(zip(symbols[:-1], symbols[1:]))
        best = min(pairs, key=lambda pair: bpe_ranks.get(pair, float("inf")))
        if best not in bpe_ranks:
            break
        symbols = merge_pair(symbols, best)
        steps.append(symbols)
    return steps


def bpe(symbols: tuple, bpe_ranks: dict) -> tuple:
    """The pieces byte-pair encoding makes of `symbols`: the last of `bpe_steps`."""
    return bpe_steps(symbols, bpe_ranks)[-1]


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer with SD v1's start/end tokens, truncation and padding."""

    def __init__(
        self,
        merges: Sequence[tuple[str, str]],
        vocab: dict[str, int] | None = None,
        context_length: int = CONTEXT_LENGTH,
        pad_text: str = EOT_TEXT,
    ):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.merges = [tuple(m) for m in merges]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        if vocab is None:
            # CLIP's id order: bytes, bytes ending a word, one id per merge, then the special tokens.
            symbols = list(self.byte_encoder.values())
            names = symbols + [s + END_OF_WORD for s in symbols]
            names += ["".join(pair) for pair in self.merges] + [SOT_TEXT, EOT_TEXT]
            vocab = {name: i for i, name in enumerate(names)}
        self.encoder = dict(vocab)
        self.decoder = {i: name for name, i in self.encoder.items()}
        self.context_length = context_length
        self.vocab_size = len(self.encoder)
        self.sot_token = self.encoder[SOT_TEXT]
        self.eot_token = self.encoder[EOT_TEXT]
        self.pad_token = self.encoder[pad_text]
        self.special_tokens = {self.sot_token, self.eot_token, self.pad_token}
        # Prompts repeat the same words; BPE on a word is the slow part, so remember the answers.
        self.cache: dict[str, tuple[str, ...]] = {SOT_TEXT: (SOT_TEXT,), EOT_TEXT: (EOT_TEXT,)}
        # Added tokens (textual inversion): a string matched in the raw prompt before BPE -> its ids.
        self.added_tokens: dict[str, list[int]] = {}
        self._added_pattern = None

    def why_not_new(self, token: str, count: int = 1) -> str | None:
        """Why `add_tokens(token, count)` would refuse the token (blank, or a name already taken), else None."""
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        taken = [n for n in names if n in self.encoder or n in self.added_tokens]
        if taken:
            return f"{taken[0]!r} is already in the vocabulary"
        return None if token.strip() else "it is blank"

    def add_tokens(self, token: str, count: int = 1) -> list[int]:
        """Add `token` with `count` new ids after the vocabulary; returns the ids.

        The token is matched in the raw prompt, case-sensitively, before any cleaning or BPE (like a
        Hugging Face added token), and stands for all `count` ids: a multi-vector embedding. As in
        diffusers, the ids after the first are also reachable alone as token_1, token_2, ...
        """
        why = self.why_not_new(token, count)
        if why:
            raise ValueError(f"cannot add the token {token!r}: {why}")
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        ids = list(range(self.vocab_size, self.vocab_size + count))
        self.added_tokens[token] = ids
        for i in range(1, count):
            self.added_tokens[names[i]] = [ids[i]]
        for name, i in zip(names, ids):
            self.decoder[i] = name
        self.vocab_size += count
        # longest first, so that "<cat>_1" is not read as "<cat>" followed by "_1"
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._added_pattern = regex.compile("|".join(regex.escape(a) for a in alternatives))
        return ids

    # ------------------------------------------------------------------ loading
    @classmethod
    def default(cls, path: str | None = None, context_length: int = CONTEXT_LENGTH) -> "CLIPTokenizer":
        """The tokenizer from the `clip` package's bpe_simple_vocab_16e6.txt.gz (or another such file),
        padding and truncating to `context_length` (77 for SD; a smaller text encoder may have fewer)."""
        path = path or clip_vocab_file()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; CLIP uses the first NUM_MERGES merges of the file.
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        return cls(merges, context_length=context_length)

    @classmethod
    def from_folder(cls, path: str) -> "CLIPTokenizer":
        """The tokenizer from a Hugging Face style folder: vocab.json + merges.txt, or only the
        tokenizer.json that folders saved by transformers 5 contain.

        `path` is the tokenizer folder itself or a diffusers pipeline folder with a tokenizer/
        subfolder. A special_tokens_map.json (or tokenizer_config.json), when present, names the
        padding token.
        """
        if not any(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "tokenizer.json")):
            path = os.path.join(path, "tokenizer")
        if os.path.exists(os.path.join(path, "vocab.json")) or not os.path.exists(os.path.join(path, "tokenizer.json")):
            with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
                lines = [line for line in f.read().split("\n") if line.strip()]
            if lines and lines[0].startswith("#version"):
                lines = lines[1:]
            merges = [tuple(line.split()) for line in lines]
            settings = os.path.join(path, "special_tokens_map.json")
        else:
            with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
                model = json.load(f)["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            settings = os.path.join(path, "tokenizer_config.json")
        pad_text = EOT_TEXT
        if os.path.exists(settings):
            with open(settings, encoding="utf-8") as f:
                pad = json.load(f).get("pad_token") or EOT_TEXT
            pad_text = pad["content"] if isinstance(pad, dict) else pad
        return cls(merges, vocab, pad_text=pad_text)

    # ------------------------------------------------------------------ BPE
    def bpe_steps(self, word: str) -> list[tuple[str, ...]]:
        """Every state of BPE on one byte-encoded word, from single characters to the final pieces."""
        return bpe_steps(tuple(word[:-1]) + (word[-1] + END_OF_WORD,), self.bpe_ranks)

    def bpe(self, word: str) -> tuple[str, ...]:
        """The vocabulary pieces of one byte-encoded word (cached)."""
        if word not in self.cache:
            self.cache[word] = self.bpe_steps(word)[-1]
        return self.cache[word]

    # ------------------------------------------------------------------ text <-> ids
    def words(self, text: str) -> list[str]:
        """The cleaned text cut into words by CLIP's pre-tokenizer, each spelled with the byte table."""
        return [
            "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            for word in CLIP_PATTERN.findall(clean_text(text))
        ]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens and without truncation."""
        if self._added_pattern is not None:  # added tokens first; the text between them goes through BPE
            ids, start = [], 0
            for match in self._added_pattern.finditer(text):
                ids += self.encode_bpe(text[start:match.start()]) + self.added_tokens[match.group()]
                start = match.end()
            return ids + self.encode_bpe(text[start:])
        return self.encode_bpe(text)

    def encode_bpe(self, text: str) -> list[int]:
        """Token ids of `text` by the pre-tokenizer and BPE alone."""
        # An unknown piece cannot come out of byte-level BPE with a matching vocabulary; like
        # CLIP's Hugging Face tokenizer, map it to <|endoftext|> rather than fail.
        return [
            self.encoder.get(piece, self.eot_token)
            for word in self.words(text)
            for piece in self.bpe(word)
        ]

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a list of ids; word ends become spaces, start/end/padding tokens are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_tokens:
                continue
            if i >= len(self.encoder):  # an added token: its own text, as a word
                data += (self.decoder[i] + END_OF_WORD).encode("utf-8")
            else:  # special tokens are plain ASCII, which the byte table maps to itself
                data += bytes(self.byte_decoder[c] for c in self.decoder[i])
        return " ".join(data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").split())

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """A batch of prompts as a LongTensor (B, context_length): sot, pieces, eot, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.context_length - 2
        rows = []
        for index, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                dropped = len(ids) - room
                warnings.warn(
                    f"prompt {index} has {len(ids)} tokens but CLIP reads at most {room}: "
                    f"the last {dropped} tokens were dropped ({self.decode(ids[room:])!r})",
                    stacklevel=2,
                )
                ids = ids[:room]
            row = [self.sot_token] + ids + [self.eot_token]
            rows.append(row + [self.pad_token] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)
