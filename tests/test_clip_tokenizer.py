"""CLIP tokenizer: ids equal open_clip's on a committed fixture, and CLIP's framing rules.

``tests/fixtures/clip_tokenizer_reference.npz`` holds 300 texts (unicode, emoji, HTML entities,
mojibake, numbers, empty strings, texts far over 77 tokens) and the ids open_clip 3.3.0's
tokenizer gave them (``launch/make_clip_fixtures.py``).
"""

import gzip
import json
import pickle
import random
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from jaxclip import clip_tokenizer as ct
from jaxclip.data.pipeline import make_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "clip_tokenizer_reference.npz"


def _fixture():
    data = np.load(FIXTURE)
    texts = json.loads(data["texts_json"].tobytes().decode("utf-8"))
    return texts, data["ids"].astype(np.int32)


def test_ids_equal_open_clip_on_the_fixture():
    texts, reference = _fixture()
    tokens, _ = ct.clip_tokenizer()(texts)
    mismatched = [texts[i][:60] for i in np.where((tokens != reference).any(1))[0]]
    assert not mismatched, f"{len(mismatched)} texts tokenized differently: {mismatched[:5]}"


def test_fixture_covers_truncation_and_empty_texts():
    texts, reference = _fixture()
    lengths = (reference != 0).sum(1)
    assert (lengths == 77).sum() >= 20  # truncated: every position holds a real token
    assert "" in texts and (lengths == 2).any()


def test_mask_covers_start_to_end_token_and_truncation_keeps_the_end_token():
    tok = ct.clip_tokenizer()
    tokens, mask = tok(["a photo of a dog", "word " * 200, ""])
    for row, m in zip(tokens, mask, strict=True):
        n = int(m.sum())
        assert row[0] == tok.sot_id == 49406 and row[n - 1] == tok.eot_id == 49407
        assert (m[:n] == 1).all() and (m[n:] == 0).all() and (row[n:] == ct.PAD_ID).all()
    assert mask[1].sum() == 77 and mask[2].sum() == 2


def test_context_length_other_than_77():
    tokens, mask = ct.clip_tokenizer(16)(["word " * 50])
    assert tokens.shape == (1, 16) and tokens[0, -1] == 49407 and mask.sum() == 16


def test_cleaning_repairs_unescapes_twice_collapses_whitespace_and_lowercases():
    assert ct.clean_text("  A\t\nPhoto\u3000OF  ") == "a photo of"
    assert ct.clean_text("&amp;amp; &lt;b&gt;") == "& <b>"
    assert ct.clean_text("cafÃ©") == "café"  # ftfy repairs the mojibake
    assert ct.clean_text("ΟΔΥΣΣΕΥΣ") == "οδυσσευς"  # Python's final sigma, as the reference


def test_decode_returns_the_cleaned_text():
    tok = ct.clip_tokenizer()
    tokens, _ = tok(["A Photo of a DOG, café 東京 🙂!"])
    assert tok.decode(tokens) == ["a photo of a dog , café 東京 🙂!"]


def test_byte_symbols_are_the_byte_level_alphabet_in_clip_order():
    symbols = ct.byte_symbols()
    assert len(set(symbols)) == 256 and symbols[0] == "!" and symbols[-1] == chr(256 + 67)
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())


def test_tokenizer_survives_pickling_for_data_workers():
    tok = ct.clip_tokenizer()
    texts = ["A RED circle &amp; a blue star", "x" * 500]
    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, ct.ClipTokenizer) and clone.identity == tok.identity
    np.testing.assert_array_equal(clone(texts)[0], tok(texts)[0])


def test_config_name_clip_selects_it():
    cfg = ml_collections.ConfigDict(dict(tokenizer="clip", context_length=77))
    tok = make_tokenizer(cfg)
    assert isinstance(tok, ct.ClipTokenizer) and tok.vocab_size == 49408


def test_damaged_merges_file_is_refused(tmp_path):
    path = tmp_path / "merges.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("a b\nc d\n")
    with pytest.raises(ValueError, match="should hold 48894 BPE merges"):
        ct.load_merges(path)


def test_ids_equal_open_clip_on_fresh_random_texts():
    from reference_libs import require_reference

    require_reference()
    import open_clip

    pool, _ = _fixture()
    rng = random.Random(1)  # new texts: pieces of the fixture's glued at random points
    texts = [rng.choice(pool)[: rng.randrange(80)] + rng.choice(pool)[-40:] for _ in range(200)]
    reference = open_clip.get_tokenizer("ViT-B-16")(texts).numpy()
    np.testing.assert_array_equal(ct.clip_tokenizer()(texts)[0], reference)
