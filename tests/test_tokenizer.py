"""Tests of the tokenizer wrapper and the shapes-world tokenizer."""

import pickle

import numpy as np

from jaxclip.data import shapes
from jaxclip.data.shapes import shapes_tokenizer
from jaxclip.tokenizer import EOT, SOT, Tokenizer


def test_shapes_tokenizer_round_trips_captions():
    tok = shapes_tokenizer(32)
    texts = ["a red circle", "a large red circle left of a small blue star"]
    tokens, _ = tok(texts)
    assert tok.decode(tokens) == texts


def test_every_vocabulary_word_is_known():
    tok = shapes_tokenizer()
    tokens, mask = tok([" ".join(shapes.vocabulary())])
    assert tok.token_to_id("<unk>") not in tokens[mask == 1]


def test_sequences_start_with_sot_and_end_with_eot_even_when_truncated():
    tok = shapes_tokenizer(6)
    tokens, mask = tok(["a red circle", "a large red circle left of a small blue star"])
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    for row, m in zip(tokens, mask, strict=True):
        assert row[0] == sot
        assert row[m.sum() - 1] == eot
    assert mask[1].sum() == 6


def test_padding_uses_id_zero_and_mask_marks_real_tokens():
    tok = shapes_tokenizer(10)
    tokens, mask = tok(["a red circle", ""])
    assert tok.pad_id == 0
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    assert tokens.shape == mask.shape == (2, 10)
    np.testing.assert_array_equal(mask.sum(1), [5, 2])
    assert (tokens[mask == 0] == 0).all()
    assert (tokens[mask == 1] != 0).all()


def test_input_is_lower_cased():
    tok = shapes_tokenizer()
    np.testing.assert_array_equal(tok(["A RED Circle"])[0], tok(["a red circle"])[0])


def test_building_twice_gives_identical_json(tmp_path):
    shapes_tokenizer().to_file(tmp_path / "a.json")
    shapes_tokenizer(16).to_file(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert shapes_tokenizer().identity == shapes_tokenizer(16).identity


def test_survives_pickle_round_trip():
    tok = shapes_tokenizer(12)
    clone = pickle.loads(pickle.dumps(tok))
    texts = ["a photo of a green star"]
    assert clone.identity == tok.identity and clone.vocab_size == tok.vocab_size
    for a, b in zip(clone(texts), tok(texts), strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_file_loads_a_written_tokenizer(tmp_path):
    tok = shapes_tokenizer(16)
    path = tmp_path / "tok.json"
    tok.to_file(path)
    loaded = Tokenizer.from_file(path, context_length=16)
    assert loaded.identity == tok.identity and loaded.pad_id == 0
    texts = ["a small white heart above a large cyan cross"]
    np.testing.assert_array_equal(loaded(texts)[0], tok(texts)[0])


def test_vocab_size_counts_specials_and_words():
    assert shapes_tokenizer().vocab_size == 4 + len(shapes.vocabulary())
