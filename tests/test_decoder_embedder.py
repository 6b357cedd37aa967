"""Decoder-LLM embedders against transformers, and sharded against single-device.

The references are the committed fixture (launch/make_decoder_fixture.py): tiny random Qwen3,
Qwen2 (two safetensors shards + index, YaRN rope) and Mistral (tied, under "model.") models
run by transformers 5.23 in float32, causal and bidirectional, padded left and right.
NV-Embed's latent-attention pooling has no runnable reference here, so it is checked against a
float64 numpy version of its equations computed from the checkpoint's own tensors.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from decoder_fixtures import (
    ARCHS,
    FIXTURES,
    RULES,
    cosine,
    latent_tensors,
    make_nv_embed_dir,
    mesh,
    numpy_latent_pool,
    reference,
)
from flax import nnx

from jaxclip.models import decoder_embedder as de

REF = reference()
TEXTS = [str(t) for t in REF["texts"]]


def _load(arch: str, **kw) -> de.DecoderEmbedder:
    kw.setdefault("dtype", "float32")
    return de.load_decoder_embedder(FIXTURES / arch, mesh=mesh(), rules=RULES, **kw)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_and_pooling_match_transformers(arch: str, attention: str, side: str):
    key = f"{arch}/{attention}/{side}"
    ids, mask = REF[f"{key}/input_ids"], REF[f"{key}/attention_mask"]
    model = _load(arch, attention=attention).model
    states = nnx.jit(lambda m, t, k: m.decoder(t, k))(model, ids, mask)
    n = int(REF["hidden_texts"])
    real = np.asarray(states)[:n][mask[:n].astype(bool)]
    np.testing.assert_allclose(real, REF[f"{key}/hidden"], atol=2e-5, rtol=0)
    for pooling in ("last", "mean"):
        model.pooling = pooling
        pooled = nnx.jit(lambda m, t, k: m(t, k, k))(model, ids, mask)
        cos = cosine(pooled, REF[f"{key}/{pooling}"])
        assert cos.min() >= 0.9999, (pooling, cos.min(), TEXTS[int(cos.argmin())])


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_tokenizes_buckets_and_pools_like_the_reference(arch: str):
    embedder = _load(arch)
    side = "left" if arch.startswith("qwen") else "right"
    key = f"{arch}/causal/{side}"
    ids, mask = REF[f"{key}/input_ids"], REF[f"{key}/attention_mask"]
    expected_ids = [list(row[m.astype(bool)]) for row, m in zip(ids, mask, strict=True)]
    assert embedder.token_ids(TEXTS) == expected_ids
    assert embedder.text.padding_side == side
    vectors = embedder.embed(TEXTS, batch_size=8)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 64)
    cos = cosine(vectors, REF[f"{key}/last"])
    assert cos.min() >= 0.9999, (cos.min(), TEXTS[int(cos.argmin())])


def test_mean_pooling_and_padding_side_are_options():
    embedder = _load("qwen3", pooling="mean", padding_side="right")
    cos = cosine(embedder.embed(TEXTS, batch_size=16), REF["qwen3/causal/right/mean"])
    assert cos.min() >= 0.9999


def test_batch_size_and_order_do_not_change_the_embeddings():
    embedder = _load("qwen2")
    full = embedder.embed(TEXTS, batch_size=32)
    np.testing.assert_allclose(embedder.embed(TEXTS, batch_size=1), full, atol=2e-6)
    reverse = embedder.embed(TEXTS[::-1], batch_size=5)
    np.testing.assert_allclose(reverse[::-1], full, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# NV-Embed: bidirectional Mistral + latent attention
# ---------------------------------------------------------------------------------------------


def test_nv_embed_checkpoint_matches_numpy_latent_attention(tmp_path):
    d = make_nv_embed_dir(tmp_path)
    embedder = de.load_decoder_embedder(d, mesh=mesh(), rules=RULES, dtype="float32")
    assert (embedder.model.pooling, embedder.model.decoder.causal) == ("latent", False)
    assert embedder.text.padding_side == "right" and embedder.text.append_eos
    ids = embedder.token_ids(TEXTS)
    assert all(row[0] == 1 and row[-1] == 2 for row in ids)  # <s> ... </s>
    vectors = embedder.embed(TEXTS, batch_size=8)

    tokens, mask = de._pad(ids, max(map(len, ids)), 2, "right")
    states = nnx.jit(lambda m, t, k: m.decoder(t, k))(embedder.model, tokens, mask)
    expected = numpy_latent_pool(states, mask, latent_tensors())
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)


def test_nv_embed_instruction_is_left_out_of_the_pooling(tmp_path):
    d = make_nv_embed_dir(tmp_path)
    instruction = "Instruct: find the shape\nQuery: "
    embedder = de.load_decoder_embedder(
        d, mesh=mesh(), rules=RULES, dtype="float32", instruction=instruction
    )
    texts = TEXTS[:6]
    ids = embedder.token_ids(texts)
    prefix = embedder._prefix_tokens()
    assert prefix > 3
    tokens, mask = de._pad(ids, max(map(len, ids)), 2, "right")
    states = nnx.jit(lambda m, t, k: m.decoder(t, k))(embedder.model, tokens, mask)
    pool_mask = mask.copy()
    pool_mask[:, :prefix] = 0  # NV-Embed's own rule, on right-padded rows
    expected = numpy_latent_pool(states, pool_mask, latent_tensors())
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(texts, batch_size=4), expected, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Sharded over 8 devices (fsdp x tensor) == one device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_embeddings_equal_single_device(tmp_path, shape):
    for path in (FIXTURES / "qwen3", make_nv_embed_dir(tmp_path)):
        one = de.load_decoder_embedder(path, mesh=mesh(), rules=RULES, dtype="float32")
        many = de.load_decoder_embedder(path, mesh=mesh(shape), rules=RULES, dtype="float32")
        q = many.model.decoder.q_kernel.get_value()
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert (
            len(q.addressable_shards) == 8
            and q.addressable_shards[0].data.shape[1] == 64 // shape[1]
        )
        np.testing.assert_allclose(
            many.embed(TEXTS, batch_size=8), one.embed(TEXTS, batch_size=8), atol=2e-6
        )


def test_bfloat16_stays_close_to_float32():
    f32 = _load("qwen3").embed(TEXTS, batch_size=8)
    bf16 = _load("qwen3", dtype="bfloat16")
    assert bf16.model.decoder.q_kernel.get_value().dtype == jax.numpy.bfloat16
    assert cosine(bf16.embed(TEXTS, batch_size=8), f32).min() > 0.99
