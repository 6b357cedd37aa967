"""Decoder embedders: refused checkpoints and configs, rope scaling against transformers,
latent-attention pooling against float64 numpy, bucketing, identity and the AOT compile."""

from __future__ import annotations

import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_fixtures import FIXTURES, RULES, copy_fixture, cosine, mesh, reference
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxclip.models import decoder_embedder as de
from jaxclip.models import decoder_llm, embedding_pooling, hf_checkpoint

AXIS_NAMES = {"vocab", "embed", "heads", "kv", "mlp", "norm", "layers", None}


def _load(path, **kw):
    return de.load_decoder_embedder(path, mesh=mesh(), rules=RULES, dtype="float32", **kw)


# ---------------------------------------------------------------------------------------------
# Refused inputs, with messages that name the problem
# ---------------------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = copy_fixture("qwen3", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["layers.1.self_attn.k_norm.weight"]
    tensors["layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(hf_checkpoint.CheckpointError, match="missing tensors") as err:
        _load(d)
    assert "layers.1.self_attn.k_norm.weight" in str(err.value)
    assert "unexpected tensors ['layers.7.mlp.up_proj.weight']" in str(err.value)


def test_a_shard_named_by_the_index_must_exist(tmp_path):
    d = copy_fixture("qwen2", tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        _load(d)


def test_unsupported_architecture_is_refused(tmp_path):
    d = copy_fixture("qwen3", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(decoder_llm.ConfigError, match="'llama' is not a supported") as err:
        _load(d)
    assert "mistral" in str(err.value) and "qwen3" in str(err.value)


def test_weights_that_disagree_with_the_config_are_refused(tmp_path):
    d = copy_fixture("mistral", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "intermediate_size": 96}))
    with pytest.raises(hf_checkpoint.CheckpointError, match="mlp.gate_proj.weight") as err:
        _load(d)
    assert "(128, 64)" in str(err.value) and "(96, 64)" in str(err.value)


def test_an_embedding_size_the_encoder_cannot_give_is_refused():
    with pytest.raises(ValueError, match="not a Matryoshka model"):
        _load(FIXTURES / "mistral", dim=32)
    with pytest.raises(ValueError, match="embeds into 64 dimensions"):
        _load(FIXTURES / "qwen3", dim=128)
    with pytest.raises(ValueError, match="latent pooling needs an NV-Embed"):
        _load(FIXTURES / "qwen3", pooling="latent")


def test_qwen3_matryoshka_prefix_is_renormalized():
    texts = ["a red circle", "two blue squares above a star"]
    full = _load(FIXTURES / "qwen3", normalize=False).embed(texts, 2)
    short = _load(FIXTURES / "qwen3", dim=16).embed(texts, 2)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=-1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)


def test_every_parameter_has_logical_axes():
    model = _load(FIXTURES / "qwen2").model
    params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    assert len(params) == 1 + 1 + 9 + 3  # embed, final norm, 9 per-layer kinds, q/k/v biases
    for path, var in params:
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim and set(axes) <= AXIS_NAMES, (path, axes)
    assert sum(v.get_value().size for _, v in params) == model.decoder.cfg.num_params()


# ---------------------------------------------------------------------------------------------
# Pieces against independent references
# ---------------------------------------------------------------------------------------------


def test_rope_scaling_matches_transformers():
    with np.load(FIXTURES / "rope_reference.npz") as ref:
        names = sorted({k.split("/")[0] for k in ref.files})
        assert names == ["linear", "llama3", "yarn", "yarn_mscale"]
        for name in names:
            raw = dict(model_type="qwen3", vocab_size=8, hidden_size=64, intermediate_size=8,
                       num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=512,
                       rope_parameters=json.loads(str(ref[f"{name}/config"])))  # fmt: skip
            inv_freq, factor = decoder_llm.rope_frequencies(
                decoder_llm.DecoderConfig.from_dict(raw)
            )
            np.testing.assert_allclose(inv_freq, ref[f"{name}/inv_freq"], rtol=1e-6, err_msg=name)
            assert factor == pytest.approx(float(ref[f"{name}/attention_factor"])), name


def test_transformers_4_and_5_rope_configs_read_the_same():
    v5 = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    a, b = (decoder_llm.DecoderConfig.from_dict(c) for c in (v5, v4))
    assert a == b and dict(a.rope_scaling)["type"] == "yarn" and a.rope_theta == 1e6


def _numpy_latent(p: dict, states: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    """Latent-attention pooling in float64 from the equations (embedding_pooling docstring)."""
    erf = np.vectorize(math.erf)

    def ln(x, scale, bias):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(
            x.var(-1, keepdims=True) + 1e-5
        ) * scale + bias

    H = states
    Q = np.einsum(
        "bld,dhe->blhe", ln(H, p["query_norm_scale"], p["query_norm_bias"]), p["q_kernel"]
    )
    Z = ln(p["latents"], p["latent_norm_scale"], p["latent_norm_bias"])
    K, V = np.einsum("rd,dhe->rhe", Z, p["k_kernel"]), np.einsum("rd,dhe->rhe", Z, p["v_kernel"])
    S = np.einsum("blhe,rhe->bhlr", Q, K) / math.sqrt(Q.shape[-1])
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    A = H + np.einsum("blhe,hed->bld", np.einsum("bhlr,rhe->blhe", P, V), p["o_kernel"])
    h = ln(A, p["mlp_norm_scale"], p["mlp_norm_bias"])
    x, g = h @ p["value_kernel"] + p["value_bias"], h @ p["gate_kernel"] + p["gate_bias"]
    out = A + (x * 0.5 * g * (1 + erf(g / math.sqrt(2)))) @ p["down_kernel"] + p["down_bias"]
    m = mask[..., None].astype(np.float64)
    return (out * m).sum(1) / m.sum(1)


def test_latent_attention_pooling_matches_float64_numpy():
    cfg = embedding_pooling.LatentAttentionConfig(
        hidden_size=32, num_latents=12, num_heads=4, head_dim=6
    )
    pooler = embedding_pooling.LatentAttentionPooling(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    params = {}
    for path, var in nnx.iter_graph(pooler):
        if isinstance(var, nnx.Param):
            value = 0.3 * rng.standard_normal(var.get_value().shape)
            var.set_value(jnp.asarray(value, jnp.float32))
            params[path[-1]] = np.asarray(var.get_value(), np.float64)
    states = rng.standard_normal((3, 7, 32))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5], np.int32)
    got = pooler(jnp.asarray(states, jnp.float32), jnp.asarray(mask))
    want = _numpy_latent(params, states, mask, cfg.num_heads)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_last_token_pool_finds_the_last_real_token_on_either_side():
    states = jnp.arange(2 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 1)
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(embedding_pooling.last_token_pool(states, mask)[:, 0], [2, 9])


def test_bucket_lengths_are_powers_of_two_from_16_capped_at_max_length():
    got = [de.bucket_length(n, 77) for n in (1, 16, 17, 33, 64, 65, 77)]
    assert got == [16, 16, 32, 64, 64, 77, 77]
    assert de.bucket_length(3, 8) == 8


# ---------------------------------------------------------------------------------------------
# Identity and ahead-of-time compilation
# ---------------------------------------------------------------------------------------------


def test_identity_records_what_the_embeddings_depend_on():
    embedder = _load(FIXTURES / "qwen2", name="tiny-qwen2", max_length=77)
    identity = embedder.identity
    files = sorted((FIXTURES / "qwen2").glob("*.safetensors"))
    lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    assert identity == dict(
        name="tiny-qwen2", architecture="qwen2", pooling="last", attention="causal",
        normalize=True, instruction="", max_length=77, dim=64, dtype="float32",
        weights_sha256=hashlib.sha256(lines.encode()).hexdigest(),
    )  # fmt: skip


def test_file_sha256_takes_a_hugging_face_cache_blob_name(tmp_path):
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / digest).write_bytes(data)
    (tmp_path / "model.safetensors").symlink_to(tmp_path / digest)
    (tmp_path / digest).write_bytes(b"not read: the name is the digest")
    assert hf_checkpoint.file_sha256(tmp_path / "model.safetensors") == digest


def test_embed_step_compiles_for_8_devices_from_the_config_alone():
    compiled = de.compile_embed_step(
        FIXTURES / "mistral", jax.devices()[:8], batch=16, length=32, rules=RULES,
        dtype="bfloat16", mesh_shape={"data": 1, "fsdp": 4, "tensor": 2},
    )  # fmt: skip
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0
    out = compiled.out_info
    assert out.shape == (16, 64) and out.dtype == jnp.float32


def test_compiled_step_agrees_with_the_loaded_embedder():
    """The AOT path builds the very step `embed` runs: same graph, same output."""
    embedder = _load(FIXTURES / "qwen3")
    ref = reference()
    ids, mask = ref["qwen3/causal/left/input_ids"][:8], ref["qwen3/causal/left/attention_mask"][:8]
    compiled = de.compile_embed_step(
        FIXTURES / "qwen3", jax.devices()[:1], batch=8, length=ids.shape[1], rules=RULES,
        dtype="float32",
    )  # fmt: skip
    out = compiled(embedder._state, ids, mask, mask)
    assert cosine(out, ref["qwen3/causal/left/last"][:8]).min() >= 0.9999


def test_end_of_text_can_be_appended_for_tokenizers_that_do_not_add_it():
    plain = _load(FIXTURES / "qwen3").token_ids(["a red circle"])[0]
    appended = _load(FIXTURES / "qwen3", append_eos=True).token_ids(["a red circle"])[0]
    assert plain[-1] == 0 and appended == [*plain[:-1], 0, 0]  # <|endoftext|> is id 0
