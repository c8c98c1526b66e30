"""The CLIP tokenizer: the ids Stable Diffusion v1 was trained with, on prompts that are hard to get right.

SD v1 tokenized with transformers' Python ("slow") CLIPTokenizer, ftfy installed, called as
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`. Its text processing was
`whitespace_clean(ftfy.fix_text(text)).lower()`, then CLIP's regex and BPE. transformers 5 no longer
has that class, so two independent references stand in for it:

1. The `clip` package's SimpleTokenizer (the code the slow tokenizer was ported from), loaded from
   its file without importing the package's model code, with its one extra cleaning step removed:
   it unescapes HTML entities twice, which SD v1's tokenizer did not. Start/end tokens, truncation
   to 75 and padding with <|endoftext|> are then added as SD v1's call did (clip.tokenize pads with
   zeros instead).
2. transformers' fast (Rust) CLIPTokenizer built from a vocab.json/merges.txt written from the clip
   package's vocabulary, given `ftfy.fix_text(prompt)`, since it skips ftfy itself; called exactly
   as SD v1 called its tokenizer. It still differs from SD v1 where Rust's lower-casing differs from
   Python's (a final capital sigma becomes σ, not ς); that case is kept out of its corpus and tested
   in `test_where_references_differ`.
"""
import importlib.util
import json
import os
import random
import warnings

import ftfy
import pytest
import torch

from minildm.tokenizer import CLIPTokenizer, clip_vocab_file

SOT, EOT = 49406, 49407

WORDS = (
    "a photo of an old lighthouse on a rocky coast at dusk, dramatic clouds, volumetric light, "
    "highly detailed oil painting by a dutch master, 8k, trending on artstation; seagulls, waves "
    "crashing (wide angle) and it's raining"
).split()
LONG_PROMPT = " ".join(random.Random(0).choice(WORDS) for _ in range(200))

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Café crème brûlée à la façon de Zoë, naïve Ångström",
    "e\u0301te\u0301 in decomposed accents",
    "🐱 a cat 🚀✨ astronaut 👩‍🚀 🇯🇵 flag",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; caf&eacute;",
    "fish &amp;amp; chips",
    "<b>bold</b> &amp; tags",
    "“smart quotes” and ‘single’ ones, it’s",
    "the ﬁnest ﬂower, ﬀ",
    "ＦＵＬＬ ｗｉｄｔｈ １２３ ＡＢＣ",
    "don't it's we'll they're I'M you've I'd",
    "1234567 3.14159 2001: a space odyssey, 4k 1920x1080",
    "a   lot\tof \n\n spaces   ",
    "",
    "   ",
    "Ã©tÃ© Ã  la plage",
    "A PHOTO of The Eiffel Tower, TRENDING on ArtStation",
    "masterpiece!!! (best quality:1.2), [[detailed]] -- ...",
    "富士山 の 写真",
    "x\x1cy control characters",
    LONG_PROMPT,
]


def _load_simple_tokenizer_module():
    """clip/simple_tokenizer.py as a private module (importing `clip` would load its model code)."""
    path = os.path.join(os.path.dirname(clip_vocab_file()), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def clip_reference():
    """The clip package's tokenizer, as the package ships it (HTML unescaping included)."""
    return _load_simple_tokenizer_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def sd_reference():
    """The clip package's tokenizer with SD v1's cleaning: ftfy, whitespace, lower-case, no HTML step."""
    module = _load_simple_tokenizer_module()
    module.basic_clean = lambda text: module.ftfy.fix_text(text).strip()
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory, clip_reference):
    """A Hugging Face style tokenizer folder (vocab.json + merges.txt) written from the clip file."""
    folder = tmp_path_factory.mktemp("tokenizer")
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(clip_reference.encoder, f, ensure_ascii=False)
    merges = sorted(clip_reference.bpe_ranks, key=clip_reference.bpe_ranks.get)
    assert len(merges) == 49152 - 256 - 2
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def fast_reference(vocab_folder):
    transformers = pytest.importorskip("transformers")
    # The Rust tokenizer is CLIPTokenizerFast in transformers 4 (where CLIPTokenizer is the Python
    # one) and CLIPTokenizer, with CLIPTokenizerFast as an alias, in transformers 5.
    return transformers.CLIPTokenizerFast.from_pretrained(str(vocab_folder))


def _sd_row(ids):
    """SD v1's row for a prompt's ids: start, at most 75 ids, end, padding with the end token."""
    row = [SOT] + ids[:75] + [EOT]
    return row + [EOT] * (77 - len(row))


def _call_quietly(tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


def test_ids_match_sd_v1_reference(tokenizer, sd_reference):
    """Every awkward prompt gives the ids of SD v1's tokenizer, before and after padding."""
    for prompt in PROMPTS:
        expected = sd_reference.encode(prompt)
        assert tokenizer.encode(prompt) == expected, f"encode differs on {prompt!r}"
    tokens = _call_quietly(tokenizer, PROMPTS)
    expected = torch.tensor([_sd_row(sd_reference.encode(p)) for p in PROMPTS])
    mismatched = [PROMPTS[i] for i in range(len(PROMPTS)) if not torch.equal(tokens[i], expected[i])]
    assert not mismatched, f"rows differ on {mismatched}"


def test_rows_match_transformers_fast_tokenizer_after_ftfy(tokenizer, fast_reference):
    """The padded rows equal transformers' tokenizer called as SD v1 called it, given ftfy-fixed text."""
    expected = fast_reference(
        [ftfy.fix_text(p) for p in PROMPTS],
        padding="max_length", max_length=77, truncation=True, return_tensors="pt",
    )["input_ids"]
    tokens = _call_quietly(tokenizer, PROMPTS)
    assert tokens.shape == expected.shape == (len(PROMPTS), 77)
    mismatched = [PROMPTS[i] for i in range(len(PROMPTS)) if not torch.equal(tokens[i], expected[i])]
    assert not mismatched, f"rows differ on {mismatched}"


def test_where_references_differ(tokenizer, sd_reference, clip_reference, fast_reference):
    """The clip package (HTML unescaping) and the fast tokenizer (no ftfy, Rust lower-casing) differ."""
    # clip unescapes HTML twice; ftfy leaves entities alone when the text contains a '<'.
    prompt = "<b>bold</b> &amp; tags"
    assert tokenizer.encode(prompt) == sd_reference.encode(prompt) != clip_reference.encode(prompt)
    assert "&amp;" in tokenizer.decode(tokenizer.encode(prompt)).replace(" ", "")
    # Without ftfy, ligatures, full-width letters, curly quotes and mojibake stay as they are.
    for prompt in ["the ﬁnest ﬂower", "ＦＵＬＬ ｗｉｄｔｈ", "“smart quotes”", "Ã©tÃ©"]:
        raw = fast_reference(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.encode(prompt) == sd_reference.encode(prompt) != raw, prompt
    # Python lower-cases a word-final Σ to ς; the Rust normalizer always gives σ.
    prompt = "ΟΔΟΣ"
    fixed = fast_reference(ftfy.fix_text(prompt), add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(prompt) == sd_reference.encode(prompt) != fixed


def test_padding_uses_the_end_token(tokenizer):
    """A short prompt is start, pieces, end, then the end token again up to 77 (never zeros)."""
    tokens = tokenizer(["a cat", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    pieces = tokenizer.encode("a cat")
    assert tokens[0, : len(pieces) + 2].tolist() == [SOT] + pieces + [EOT]
    assert (tokens[0, len(pieces) + 2 :] == EOT).all()
    assert tokens[1].tolist() == [SOT] + [EOT] * 76
    assert tokenizer("a cat").shape == (1, 77)
    assert (tokenizer.sot_token, tokenizer.eot_token, tokenizer.vocab_size) == (SOT, EOT, 49408)
    assert tokenizer.context_length == 77


def test_truncation_warns_how_many_tokens_were_dropped(tokenizer):
    """A prompt over 75 pieces keeps the first 75, ends with the end token, and says how many went."""
    ids = tokenizer.encode(LONG_PROMPT)
    dropped = len(ids) - 75
    assert dropped > 0
    with pytest.warns(UserWarning, match=f"the last {dropped} tokens were dropped"):
        tokens = tokenizer(["short", LONG_PROMPT])
    assert tokens[1].tolist() == [SOT] + ids[:75] + [EOT]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(" ".join(["cat"] * 75))  # exactly 75 pieces fit without a warning


def test_encode_decode_round_trip(tokenizer):
    """Decoding gives back the cleaned text, and encoding that text again gives the same ids."""
    assert tokenizer.decode(tokenizer.encode("a photograph of an astronaut riding a horse")) == (
        "a photograph of an astronaut riding a horse"
    )
    assert tokenizer.decode(tokenizer.encode("Café ＡＢＣ ﬁne")) == "café abc fine"
    assert tokenizer.decode(tokenizer("a red cube")[0]) == "a red cube"
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert tokenizer.encode(tokenizer.decode(ids)) == ids, prompt
    raw = tokenizer.decode(tokenizer("hi")[0, :4], skip_special_tokens=False)
    assert raw == "<|startoftext|>hi <|endoftext|><|endoftext|>"


def test_folder_loading_equals_package_file(tokenizer, vocab_folder, tmp_path):
    """vocab.json + merges.txt (or a pipeline folder with tokenizer/) load the same tokenizer."""
    from_folder = CLIPTokenizer.from_folder(str(vocab_folder))
    assert from_folder.encoder == tokenizer.encoder
    assert from_folder.merges == tokenizer.merges
    assert from_folder.pad_token == EOT
    assert torch.equal(_call_quietly(from_folder, PROMPTS), _call_quietly(tokenizer, PROMPTS))

    pipeline = tmp_path / "pipeline"
    (pipeline / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (pipeline / "tokenizer" / name).write_bytes((vocab_folder / name).read_bytes())
    assert CLIPTokenizer.from_folder(str(pipeline)).encoder == tokenizer.encoder


def test_bpe_steps_merge_until_no_known_pair(tokenizer):
    """BPE starts from characters (last one marked </w>), merges one pair kind per step, and caches."""
    word = tokenizer.words("lighthouse")[0]
    steps = tokenizer.bpe_steps(word)
    assert steps[0] == tuple("lighthous") + ("e</w>",)
    assert steps[-1] == tokenizer.bpe(word) == ("lighthouse</w>",)
    for before, after in zip(steps, steps[1:]):
        assert "".join(before) == "".join(after) and len(after) < len(before)
    assert word in tokenizer.cache
    # A word with no known merge at its end stays in pieces.
    assert len(tokenizer.bpe(tokenizer.words("zqxjv")[0])) > 1
