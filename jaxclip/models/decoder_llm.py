"""A decoder-only LLM (Qwen3, Qwen2, Mistral) in Flax NNX, run as a frozen text encoder.

The three families share one block: RMSNorm -> grouped-query attention with rotary position
embeddings -> residual -> RMSNorm -> SwiGLU MLP -> residual, and a final RMSNorm. They differ
in three switches read from ``config.json``: q/k/v biases (Qwen2), a per-head RMSNorm on
queries and keys before the rotation (Qwen3), and the default rope base.

Attention is causal (as the LLMs were trained, and as Qwen3-Embedding runs) or bidirectional
(NV-Embed removes the causal mask). Padding may sit on either side: padding keys are masked and
positions count real tokens only, so a text's states do not depend on how it was padded.

Layers are stacked on a leading "layers" axis and run with `jax.lax.scan` (one compiled block
however deep the model); `scan=False` loops in Python over the same parameters, which is what
XLA's cost analysis needs to count every layer. Every parameter is an `nnx.Param` with
`logical_axes`, so `mesh.state_specs` shards it; nothing here names a device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclip.models import hf_checkpoint

Array = jax.Array
DType = Any

# model_type in config.json -> the switches that make it that family.
ARCHITECTURES = {
    "qwen3": dict(qkv_bias=False, qk_norm=True, rope_theta=10000.0, rms_norm_eps=1e-6),
    "qwen2": dict(qkv_bias=True, qk_norm=False, rope_theta=10000.0, rms_norm_eps=1e-6),
    "mistral": dict(qkv_bias=False, qk_norm=False, rope_theta=10000.0, rms_norm_eps=1e-6),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"
)  # fmt: skip


class ConfigError(ValueError):
    """A config.json this module cannot run: unknown architecture, missing or odd fields."""


def _unsupported(model_type: Any, path: str) -> ConfigError:
    return ConfigError(
        f"{path}: model_type {model_type!r} is not a supported decoder architecture; "
        f"supported: {sorted(ARCHITECTURES)} (and 'nvembed', whose text_config is Mistral)"
    )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The architecture fields of a Hugging Face Qwen3 / Qwen2 / Mistral ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items; () = plain rope
    max_position_embeddings: int = 32768
    sliding_window: int | None = None  # causal attention only; None = unlimited
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], path: str = "config.json") -> DecoderConfig:
        """Reads transformers-4 (top-level rope_theta / rope_scaling) and -5 (rope_parameters)
        configs; absent optional fields take the transformers class defaults."""
        arch = raw.get("model_type")
        if arch not in ARCHITECTURES:
            raise _unsupported(arch, path)
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{path}: config is missing {missing}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (silu)")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{path}: partial_rotary_factor != 1 is not supported")
        switches = ARCHITECTURES[arch]
        heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", switches["rope_theta"])))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"{path}: rope type {rope_type!r} is not one of {ROPE_TYPES}")
        scaling = (
            () if rope_type == "default" else tuple(sorted({**rope, "type": rope_type}.items()))
        )
        window = raw.get("sliding_window")
        if arch != "mistral" and not raw.get("use_sliding_window", False):
            window = None  # Qwen configs carry a window that only use_sliding_window enables
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", switches["rms_norm_eps"])),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=int(window) if window else None,
            qkv_bias=bool(raw.get("attention_bias", switches["qkv_bias"])),
            qk_norm=switches["qk_norm"],
        )

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count (the embedding table optional: it is a lookup, not a matmul)."""
        D, M, K = self.hidden_size, self.intermediate_size, self.head_dim
        N, G = self.num_heads, self.num_kv_heads
        attn = D * N * K * 2 + D * G * K * 2 + (N + 2 * G) * K * self.qkv_bias
        layer = attn + 3 * D * M + 2 * D + 2 * K * self.qk_norm
        return self.num_layers * layer + D + self.vocab_size * D * embedding


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------


def rope_frequencies(cfg: DecoderConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies (head_dim/2,) float64, attention factor) for the config's rope.

    Plain rope: theta^(-2i/d). `linear` divides every frequency by `factor`; `llama3` divides
    the low frequencies only, blending smoothly in between; `yarn` blends interpolated and
    original frequencies over a ramp of dimensions and scales cos/sin by an attention factor.
    """
    d = cfg.head_dim
    base = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    s = dict(cfg.rope_scaling)
    kind = s.get("type", "default")
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / s["factor"], 1.0
    if kind == "llama3":
        old = s["original_max_position_embeddings"]
        low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
        wavelength = 2 * np.pi / base
        smooth = (old / wavelength - low) / (high - low)
        blended = (1 - smooth) * base / factor + smooth * base
        out = np.where(wavelength > old / low, base / factor, base)
        middle = (wavelength >= old / high) & (wavelength <= old / low)
        return np.where(middle, blended, out), 1.0
    # yarn
    factor = s.get("factor") or cfg.max_position_embeddings / s["original_max_position_embeddings"]
    old = s["original_max_position_embeddings"]
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times in `old`
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    lo, hi = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    hi = hi + 0.001 if hi == lo else hi
    keep = 1 - np.clip((np.arange(d // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
    inv_freq = base / factor * (1 - keep) + base * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(attention)


def apply_rope(x: Array, positions: Array, inv_freq, factor: float) -> Array:
    """Rotates (B, L, heads, K) by position: the two halves of K form the complex pairs."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(
        np.asarray(inv_freq), jnp.float32
    )
    cos = (jnp.cos(angles) * factor)[:, :, None, :]
    sin = (jnp.sin(angles) * factor)[:, :, None, :]
    xf = x.astype(jnp.float32)
    first, second = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """x / rms(x) * scale; statistics in float32, the product in x's dtype (as transformers)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def token_positions(mask: Array) -> Array:
    """0, 1, 2, ... over the real tokens of each row, whichever side the padding is on."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def attention_bias(mask: Array, *, causal: bool, window: int | None) -> Array:
    """(B, 1, 1, L, S) bool: which keys each query may see (real keys; the past if causal)."""
    keys = mask.astype(bool)[:, None, None, None, :]
    if not causal:
        return keys
    length = mask.shape[1]
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return keys & jnp.asarray(allowed)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _param(shape, axes, dtype, init: float | None, rngs: nnx.Rngs | None) -> nnx.Param:
    """N(0, 0.02^2) (the families' initializer_range) when init is None, else a constant."""
    if init is None:
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    else:
        value = jnp.full(shape, init, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class DecoderLM(nnx.Module):
    """Token ids and mask (B, L) -> final hidden states (B, L, hidden_size), after the last norm.

    Parameters are stored in `dtype` and the computation runs in it; RMSNorm statistics,
    attention logits, softmax and rope run in float32.
    """

    PARAM_NAMES = ("input_norm", "q_kernel", "k_kernel", "v_kernel", "o_kernel", "post_norm",
                   "gate_kernel", "up_kernel", "down_kernel")  # fmt: skip

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        causal: bool = True,
        scan: bool = True,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_kv_heads}"
            )
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.causal, self.scan, self.dtype = cfg, causal, scan, dtype
        L, D, M = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        N, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def param(shape, axes, init=None):
            return _param(shape, axes, dtype, init, rngs)

        self.embed = param((cfg.vocab_size, D), ("vocab", "embed"))
        self.input_norm = param((L, D), ("layers", "norm"), 1.0)
        self.q_kernel = param((L, D, N, K), ("layers", "embed", "heads", "kv"))
        self.k_kernel = param((L, D, G, K), ("layers", "embed", "heads", "kv"))
        self.v_kernel = param((L, D, G, K), ("layers", "embed", "heads", "kv"))
        self.o_kernel = param((L, N, K, D), ("layers", "heads", "kv", "embed"))
        self.post_norm = param((L, D), ("layers", "norm"), 1.0)
        self.gate_kernel = param((L, D, M), ("layers", "embed", "mlp"))
        self.up_kernel = param((L, D, M), ("layers", "embed", "mlp"))
        self.down_kernel = param((L, M, D), ("layers", "mlp", "embed"))
        self.final_norm = param((D,), ("norm",), 1.0)
        names = list(self.PARAM_NAMES)
        if cfg.qkv_bias:
            self.q_bias = param((L, N, K), ("layers", "heads", "kv"), 0.0)
            self.k_bias = param((L, G, K), ("layers", "heads", "kv"), 0.0)
            self.v_bias = param((L, G, K), ("layers", "heads", "kv"), 0.0)
            names += ["q_bias", "k_bias", "v_bias"]
        if cfg.qk_norm:
            self.q_norm = param((L, K), ("layers", "norm"), 1.0)
            self.k_norm = param((L, K), ("layers", "norm"), 1.0)
            names += ["q_norm", "k_norm"]
        self.layer_names = tuple(names)  # the stacked (per-layer) parameters
        inv_freq, self.rope_factor = rope_frequencies(cfg)
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static, not a parameter

    def _block(self, x: Array, p: dict[str, Array], positions: Array, allowed: Array) -> Array:
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        G, R = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        h = rms_norm(x, p["input_norm"], eps)
        q = jnp.einsum("bld,dnk->blnk", h, p["q_kernel"])
        k = jnp.einsum("bld,dgk->blgk", h, p["k_kernel"])
        v = jnp.einsum("bld,dgk->blgk", h, p["v_kernel"])
        if cfg.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        if cfg.qk_norm:
            q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
        q = apply_rope(q, positions, self.inv_freq, self.rope_factor)
        k = apply_rope(k, positions, self.inv_freq, self.rope_factor)
        # Query head n uses key/value head n // R (transformers' repeat_kv).
        q = q.reshape(*q.shape[:2], G, R, cfg.head_dim) * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
        logits = jnp.einsum("blgrk,bsgk->bgrls", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bgrls,bsgk->blgrk", probs, v).reshape(q.shape[:2] + (-1, cfg.head_dim))
        x = x + jnp.einsum("blnk,nkd->bld", out, p["o_kernel"])
        h = rms_norm(x, p["post_norm"], eps)
        h = jax.nn.silu(h @ p["gate_kernel"]) * (h @ p["up_kernel"])
        return x + h @ p["down_kernel"]

    def __call__(self, tokens: Array, mask: Array) -> Array:
        if tokens.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {tokens.shape[1]} > max_position_embeddings "
                f"{self.cfg.max_position_embeddings}"
            )
        positions = token_positions(mask)
        window = self.cfg.sliding_window
        allowed = attention_bias(mask, causal=self.causal, window=window)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        params = {name: getattr(self, name)[...].astype(self.dtype) for name in self.layer_names}

        def block(h: Array, layer: dict[str, Array]) -> tuple[Array, None]:
            return self._block(h, layer, positions, allowed), None

        if self.scan:
            x, _ = jax.lax.scan(block, x, params)
        else:
            for i in range(self.cfg.num_layers):
                x, _ = block(x, jax.tree.map(lambda a, i=i: a[i], params))
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# The published (Hugging Face) tensor names
# ---------------------------------------------------------------------------------------------

# Prefixes the decoder's tensors may carry: none (Qwen3Model, as Qwen3-Embedding ships),
# "model." (XxxForCausalLM), "embedding_model." (NV-Embed).
HF_PREFIXES = ("", "model.", "embedding_model.")


def hf_placements(cfg: DecoderConfig, prefix: str) -> dict[str, hf_checkpoint.Placement]:
    """Parameter name -> the checkpoint tensors that fill it, per layer where stacked."""
    K = cfg.head_dim
    heads = dict(layout="split_heads", head_dim=K)

    def layers(suffix: str, **how) -> hf_checkpoint.Placement:
        names = (f"{prefix}layers.{i}.{suffix}" for i in range(cfg.num_layers))
        return hf_checkpoint.per_layer(hf_checkpoint.Source(n, **how) for n in names)

    out = {
        "embed": hf_checkpoint.single(hf_checkpoint.Source(f"{prefix}embed_tokens.weight")),
        "final_norm": hf_checkpoint.single(hf_checkpoint.Source(f"{prefix}norm.weight")),
        "input_norm": layers("input_layernorm.weight"),
        "post_norm": layers("post_attention_layernorm.weight"),
        "q_kernel": layers("self_attn.q_proj.weight", **heads),
        "k_kernel": layers("self_attn.k_proj.weight", **heads),
        "v_kernel": layers("self_attn.v_proj.weight", **heads),
        "o_kernel": layers("self_attn.o_proj.weight", layout="merge_heads", head_dim=K),
        "gate_kernel": layers("mlp.gate_proj.weight", layout="transpose"),
        "up_kernel": layers("mlp.up_proj.weight", layout="transpose"),
        "down_kernel": layers("mlp.down_proj.weight", layout="transpose"),
    }
    if cfg.qkv_bias:
        for name in "qkv":
            out[f"{name}_bias"] = layers(
                f"self_attn.{name}_proj.bias", layout="bias_heads", head_dim=K
            )
    if cfg.qk_norm:
        out["q_norm"] = layers("self_attn.q_norm.weight")
        out["k_norm"] = layers("self_attn.k_norm.weight")
    return out


def hf_ignored(prefix: str) -> tuple[str, ...]:
    """Tensors a checkpoint may hold that an encoder does not use: the LM head (tied or not)."""
    return ("lm_head.weight",) if prefix == "model." else ()
