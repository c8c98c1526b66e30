"""Exercises for lesson 04, byte-pair encoding. Check them with:  python -m minildm.check 04

Lesson 04, section 1.4 ("Byte-pair merges"), explains the loop. A word starts as a tuple of symbols,
one per character, the last one carrying the end-of-word marker "</w>": "low" -> ("l", "o", "w</w>").
`bpe_ranks` maps a pair of symbols to its rank: the order in which CLIP learnt its merges (0 first).
The check runs your loop on every word of an awkward prompt with CLIP's real merge table.
"""


def merge_pair(symbols: tuple, pair: tuple) -> tuple:
    """symbols with every occurrence of `pair` = (a, b) as adjacent symbols replaced by the one symbol a + b.

    Occurrences are taken left to right and do not overlap: ("a", "a", "a", "a</w>") with the pair
    ("a", "a") gives ("aa", "a", "a</w>"). Returns a tuple (equal to symbols when the pair does not occur).
    """
    raise NotImplementedError


def bpe(symbols: tuple, bpe_ranks: dict) -> tuple:
    """The pieces CLIP's tokenizer cuts a word into: symbols after the BPE merges, the learnt ones only,
    each time the adjacent pair that was learnt earliest, until no adjacent pair has a rank."""
    raise NotImplementedError
