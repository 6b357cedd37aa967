"""Text tokenizer: a thin, picklable wrapper around a Hugging Face ``tokenizers.Tokenizer``.

It turns a batch of strings into fixed-length ``int32`` token and mask arrays. Truncation
is delegated to ``tokenizers`` because it knows how many special tokens the
post-processor adds, so a truncated sequence still ends with the end-of-text token.

``word_level_tokenizer`` builds a word-level tokenizer offline and deterministically from a
word list (the shapes world's vocabulary, for instance). This module sits beside models and
data, which both use it, and imports neither.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
# Names tried, in order, to find the padding id of an arbitrary tokenizer.
_PAD_CANDIDATES = (PAD, "[PAD]", "<|pad|>", "<|endoftext|>")


def _base_json(tok: tokenizers.Tokenizer) -> str:
    """JSON of ``tok`` without truncation or padding: these belong to the wrapper."""
    tok = tokenizers.Tokenizer.from_str(tok.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok.to_str()


class Tokenizer:
    """Fixed-length batch tokenizer; ``tok`` itself is copied, never modified."""

    def __init__(
        self, tok: tokenizers.Tokenizer, context_length: int, pad_id: int | None = None
    ) -> None:
        if context_length < 2:
            raise ValueError("context_length must be at least 2")
        self._setup(_base_json(tok), context_length, pad_id)

    def _setup(self, json_str: str, context_length: int, pad_id: int | None) -> None:
        self._json = json_str
        self.context_length = context_length
        tok = tokenizers.Tokenizer.from_str(json_str)
        if pad_id is None:
            ids = (tok.token_to_id(t) for t in _PAD_CANDIDATES)
            pad_id = next((i for i in ids if i is not None), 0)
        self._pad_id = int(pad_id)
        tok.enable_truncation(max_length=context_length)
        pad_token = tok.id_to_token(self._pad_id) or PAD
        tok.enable_padding(length=context_length, pad_id=self._pad_id, pad_token=pad_token)
        self._tok = tok

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, context_length: int, pad_id: int | None = None
    ) -> Tokenizer:
        """Load any ``tokenizers`` JSON file."""
        return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), context_length, pad_id)

    def to_file(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON (without context length / padding settings)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self._json)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask, both int32 (N, context_length); mask is 1 on real tokens."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of strings, not a single string")
        encodings = self._tok.encode_batch(list(texts))
        shape = (len(encodings), self.context_length)
        tokens = np.array([e.ids for e in encodings], np.int32).reshape(shape)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(shape)
        return tokens, mask

    def decode(self, tokens: np.ndarray) -> list[str]:
        """Inverse of ``__call__`` for inspection (special tokens skipped)."""
        return self._tok.decode_batch(np.asarray(tokens).tolist(), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def identity(self) -> str:
        """Short digest of the tokenizer JSON, to check a checkpoint matches a tokenizer."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"identity={self.identity!r})"
        )

    # The Rust object is not picklable; grain workers get the JSON and rebuild it.
    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._json, "context_length": self.context_length, "pad_id": self._pad_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["json"], state["context_length"], state["pad_id"])


def word_level_tokenizer(words: Sequence[str], context_length: int = 32) -> Tokenizer:
    """Word-level tokenizer over `words`: ``<sot> words <eot>``, unknown words ``<unk>``.

    Ids are ``<pad>`` 0, ``<unk>`` 1, ``<sot>`` 2, ``<eot>`` 3, then the sorted distinct
    words, so the JSON is byte-identical on every build from the same words.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, SOT, EOT, *sorted(set(words))])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace splits on \w+|[^\w\s]+, i.e. on whitespace and around punctuation.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}",
        special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])],
    )
    tok.add_special_tokens([PAD, UNK, SOT, EOT])
    return Tokenizer(tok, context_length, pad_id=vocab[PAD])
