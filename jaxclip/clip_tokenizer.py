"""The OpenAI CLIP tokenizer (byte-level BPE, 49,408 tokens) on the ``tokenizers`` library.

Every published CLIP (OpenAI, open_clip, Hugging Face) reads text the same way: the text is
repaired with ftfy, HTML entities are unescaped twice, runs of whitespace become one space,
and everything is lower-cased. The result is split by CLIP's regex (contractions, letter
runs, single digits, runs of other symbols), each piece is byte-encoded and merged by BPE
with an end-of-word marker ``</w>``; ``<start_of_text>`` and ``<end_of_text>`` frame it.
Sequences are padded with id 0 to the context length (77 in CLIP), and a truncated one
still ends with ``<end_of_text>``: open_clip's conventions.

The cleaning runs in Python before the ``tokenizers`` call: ftfy has no ``tokenizers``
equivalent, and Python's ``str.lower`` (final sigma, for one) is what the reference uses.
The 48,894 merges ship with jaxclip (``assets/clip_bpe_merges.txt.gz``, written once by
``launch/make_clip_fixtures.py --vocab``); the vocabulary follows from them, so nothing is
downloaded at run time.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from jaxclip.tokenizer import Tokenizer

MERGES_FILE = Path(__file__).resolve().parent / "assets" / "clip_bpe_merges.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
PAD_ID = 0  # open_clip pads with zeros (the id of "!"); the mask tells padding apart.
END_OF_WORD = "</w>"
# CLIP's pre-tokenization: contractions, letter runs, one digit at a time, runs of other symbols.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (control
    characters, space, soft hyphen ...) take the code points from 256 upwards, in byte order.
    This is the GPT-2 byte alphabet that ``tokenizers``' ByteLevel pre-tokenizer also uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescaped twice, whitespace collapsed, lower-cased (CLIP's cleaning)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def load_merges(path: Path = MERGES_FILE) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines() if line]
    expected = VOCAB_SIZE - 2 * 256 - 2
    if len(merges) != expected or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{path} should hold {expected} BPE merges of two symbols each, found "
            f"{len(merges)}: the file is damaged; reinstall jaxclip or regenerate it with "
            f"launch/make_clip_fixtures.py --vocab"
        )
    return merges


@functools.lru_cache(maxsize=1)
def clip_bpe_json() -> str:
    """The ``tokenizers`` JSON of CLIP's BPE (no truncation or padding: the wrapper sets them)."""
    symbols = byte_symbols()
    merges = load_merges()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges)]
    vocab = {token: i for i, token in enumerate([*tokens, SOT, EOT])}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    # Bytes back to text first, then the end-of-word marks become the spaces between words.
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " ")])
    tok.add_special_tokens([SOT, EOT])  # the same ids; also matched inside a text, as in CLIP
    return tok.to_str()


class ClipTokenizer(Tokenizer):
    """``Tokenizer`` whose texts go through CLIP's cleaning first; ids equal open_clip's."""

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a sequence of strings, not a single string")
        return super().__call__([clean_text(t) for t in texts])

    def decode(self, tokens: np.ndarray) -> list[str]:
        """Cleaned text back (lower-cased); each row read up to its first end-of-text token."""
        rows = []
        for row in np.asarray(tokens).tolist():
            rows.append(row[: row.index(self.eot_id)] if self.eot_id in row else row)
        return [text.strip() for text in self._tok.decode_batch(rows, skip_special_tokens=True)]

    @property
    def identity(self) -> str:
        # The cleaning is part of the tokenizer: a digest of the JSON alone would not say so.
        digest = hashlib.sha256(("clip-clean:" + self._json).encode("utf-8"))
        return digest.hexdigest()[:16]

    @property
    def sot_id(self) -> int:
        return VOCAB_SIZE - 2

    @property
    def eot_id(self) -> int:
        return VOCAB_SIZE - 1


def clip_tokenizer(context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """CLIP's tokenizer at `context_length` (77 for every published CLIP)."""
    return ClipTokenizer(tokenizers.Tokenizer.from_str(clip_bpe_json()), context_length, PAD_ID)
