"""Exercises for lesson 04, byte-pair encoding. Check them with:  python -m minildm.check 04

The references are `minildm.tokenizer.merge_pair` and `minildm.tokenizer.bpe`, which `CLIPTokenizer` runs. A word starts as a tuple of symbols,
one per character, the last one carrying the end-of-word marker "</w>": "low" -> ("l", "o", "w</w>").
`bpe_ranks` maps a pair of symbols to its rank: the order in which CLIP learnt its merges (0 first).
"""


def merge_pair(symbols: tuple, pair: tuple) -> tuple:
    """Merge every occurrence of `pair` = (a, b) in `symbols`, scanning left to right.

    Where symbols[i] == a and symbols[i + 1] == b, emit a + b and skip both; otherwise emit symbols[i].
    ("a", "a", "a", "a</w>") with pair ("a", "a") -> ("aa", "a", "a</w>"): after a merge the scan
    continues AFTER the merged pair, so overlapping occurrences are not merged twice.
    Return a tuple (unchanged when the pair does not occur).
    """
    raise NotImplementedError


def bpe(symbols: tuple, bpe_ranks: dict) -> tuple:
    """The BPE merge loop: repeatedly merge the adjacent pair with the LOWEST rank.

    While there are at least two symbols: among the adjacent pairs (symbols[i], symbols[i + 1]) find
    the one with the lowest rank in bpe_ranks; if no pair has a rank, stop; otherwise
    symbols = merge_pair(symbols, best). Return the final tuple of pieces.
    """
    raise NotImplementedError
