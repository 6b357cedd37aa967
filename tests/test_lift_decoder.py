"""LIFT with a decoder-LLM text encoder, through the real commands: `embed_text.py --encoder`
on a text file, a store built by a tiny random Qwen3 embedder and training against it, the
embedding step's fit check for a TPU slice, and refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
from decoder_fixtures import FIXTURES, cosine, reference
from tiny import tiny_config
from training_processes import REPO, child_env

from jaxclip import caption_embeddings
from jaxclip import train as train_lib
from jaxclip.data.embedding_store import StoreError


def tiny_decoder_lift(tmp_path, arch="qwen3", **overrides):
    values = {
        "model.kind": "lift",
        "model.image.pool": "mean",
        "model.embed_dim": 64,
        "text_encoder.name": f"tiny-{arch}",
        "text_encoder.path": str(FIXTURES / arch),
        "text_encoder.dim": 64,
        "text_encoder.max_length": 32,
        "text_encoder.dtype": "float32",
        "text_encoder.batch_size": 32,
        "text_encoder.store_dir": str(tmp_path / "store"),
        "data.shapes.num_train": 256,
        "eval.tasks": "('zeroshot_colour',)",
        "train.steps": 3,
        "train.eval_every": 3,
    }
    return tiny_config(**{**values, **overrides})


def run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=child_env(8), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_embed_text_embeds_a_text_file_like_transformers(tmp_path):
    ref = reference()
    texts = [t for t in ref["texts"].tolist() if "\n" not in t]  # one text per line
    keep = [i for i, t in enumerate(ref["texts"].tolist()) if "\n" not in t]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = run(
        "launch/embed_text.py", "--encoder", str(FIXTURES / "qwen3"),
        "--texts", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "out.npy"),
        "--max_length", "128", "--dtype", "float32", "--batch_size", "8",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = np.load(tmp_path / "out.npy")
    assert rows.shape == (len(texts), 64) and rows.dtype == np.float32
    # Qwen3's defaults: causal attention, left padding, the last token, L2-normalized.
    cos = cosine(rows, ref["qwen3/causal/left/last"][keep])
    assert cos.min() >= 0.9999, cos.min()


def test_lift_trains_against_a_store_built_by_a_tiny_decoder_embedder(tmp_path):
    cfg = tiny_decoder_lift(tmp_path)
    caption_embeddings.build(cfg, progress=False)
    (store,) = caption_embeddings.open_for_training(cfg)
    encoder = store.manifest["encoder"]
    assert encoder["architecture"] == "qwen3" and encoder["pooling"] == "last"
    assert encoder["instruction"] == "" and len(encoder["weights_sha256"]) == 64
    results = train_lib.train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(results["train/loss"])
    assert "eval/zeroshot_colour/top1" in results
    # Another instruction is another encoder: the store is refused, naming the field.
    other = tiny_decoder_lift(tmp_path, **{"text_encoder.instruction": "Instruct: caption\n"})
    with pytest.raises(StoreError, match="encoder.instruction"):
        train_lib.train(other, tmp_path / "other", progress=False)


def test_a_decoder_of_another_dimension_or_no_weights_is_refused(tmp_path):
    mistral = tiny_decoder_lift(tmp_path, "mistral", **{"text_encoder.dim": 32})
    with pytest.raises(StoreError, match="not a Matryoshka model"):
        caption_embeddings.build(mistral, progress=False)
    missing = tiny_decoder_lift(tmp_path, **{"text_encoder.path": str(tmp_path)})
    with pytest.raises(StoreError, match="not a Hugging Face model directory"):
        caption_embeddings.build(missing, progress=False)
    unnamed = tiny_decoder_lift(
        tmp_path, **{"text_encoder.path": "", "text_encoder.name": "nvidia/NV-Embed-v2"}
    )
    with pytest.raises(StoreError, match=r"huggingface-cli download nvidia/NV-Embed-v2"):
        caption_embeddings.build(unnamed, progress=False)


def test_embed_text_aot_says_whether_the_encoder_fits_a_slice(tmp_path):
    pytest.importorskip("libtpu", reason="the tpu extra: pip install -e '.[tpu]'")
    config = tmp_path / "cfg.py"
    config.write_text(
        "from tiny import tiny_config\n\ndef get_config():\n"
        f"    return tiny_config(**{json.dumps({'text_encoder.path': str(FIXTURES / 'qwen3')})})\n"
    )
    out = run("launch/embed_text.py", "--config", str(config), "--aot", "v5p-8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "qwen3 decoder, last pooling" in out.stdout and "fits" in out.stdout
    assert "batch 256 x 77 tokens" in out.stdout
