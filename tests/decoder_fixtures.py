"""Shared helpers for the decoder-embedder tests: the committed transformers fixture, a tiny
NV-Embed directory built from it, and a float64 numpy latent-attention reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxclip import mesh as mesh_lib

FIXTURES = Path(__file__).parent / "fixtures" / "decoder_llm"
ARCHS = ("qwen3", "qwen2", "mistral")
RULES = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor", "kv": None,
         "layers": None, "norm": None}  # fmt: skip
# A small latent-attention layer: heads * head_dim (48) differs from hidden (64) on purpose.
LATENT = dict(num_latents_value=16, num_cross_heads=2, cross_dim_head=24, hidden_dim=64,
              latent_dim=64, output_normalize=True)  # fmt: skip
_erf = np.vectorize(math.erf)


def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def mesh(shape=(1, 1, 1)) -> jax.sharding.Mesh:
    sizes = dict(zip(mesh_lib.MESH_AXES, shape, strict=True))
    n = int(np.prod(shape))
    return mesh_lib.make_mesh(sizes, jax.devices()[:n])


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def copy_fixture(arch: str, dest: Path) -> Path:
    d = dest / arch
    shutil.copytree(FIXTURES / arch, d)
    return d


def latent_tensors(seed: int = 0, prefix: str = "latent_attention_model.") -> dict:
    """Random NV-Embed latent-attention tensors in the checkpoint's own (PyTorch) layout."""
    rng = np.random.default_rng(seed)
    D, R, H, E = (
        64,
        LATENT["num_latents_value"],
        LATENT["num_cross_heads"],
        LATENT["cross_dim_head"],
    )
    M = 4 * D
    a, m = f"{prefix}cross_attend_blocks.0.", f"{prefix}cross_attend_blocks.1."

    def w(*shape, scale=0.15):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        f"{prefix}latents": w(R, D, scale=1.0),
        f"{a}norm.weight": 1 + w(D), f"{a}norm.bias": w(D),
        f"{a}norm_context.weight": 1 + w(D), f"{a}norm_context.bias": w(D),
        f"{a}fn.to_q.weight": w(H * E, D), f"{a}fn.to_kv.weight": w(2 * H * E, D),
        f"{a}fn.to_out.weight": w(D, H * E),
        f"{m}norm.weight": 1 + w(D), f"{m}norm.bias": w(D),
        f"{m}fn.net.0.weight": w(2 * M, D), f"{m}fn.net.0.bias": w(2 * M),
        f"{m}fn.net.2.weight": w(D, M), f"{m}fn.net.2.bias": w(D),
    }  # fmt: skip


def make_nv_embed_dir(dest: Path) -> Path:
    """The tiny Mistral of the fixture as an NV-Embed checkpoint: backbone renamed under
    embedding_model., random latent-attention tensors, an nvembed config.json."""
    src = FIXTURES / "mistral"
    d = dest / "nv_embed_tiny"
    d.mkdir()
    backbone = load_file(str(src / "model.safetensors"))
    tensors = {k.replace("model.", "embedding_model.", 1): v for k, v in backbone.items()}
    tensors.update(latent_tensors())
    save_file(tensors, str(d / "model.safetensors"))
    text = json.loads((src / "config.json").read_text())
    text["model_type"] = "bidir_mistral"
    config = {"model_type": "nvembed", "padding_side": "right", "add_eos": True,
              "is_mask_instruction": True, "text_config": text,
              "latent_attention_config": {"model_type": "latent_attention", **LATENT}}  # fmt: skip
    (d / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, d / name)
    return d


def numpy_latent_pool(states, pool_mask, t: dict, prefix="latent_attention_model.") -> np.ndarray:
    """NV-Embed's latent-attention pooling in float64 from its checkpoint tensors:
    A = H + MHA(LN(H), LN(Z)) ; O = A + W2 (x * gelu(g)) ; mean over the mask."""
    H = LATENT["num_cross_heads"]
    t = {k.removeprefix(prefix): np.asarray(v, np.float64) for k, v in t.items()}
    x = np.asarray(states, np.float64)

    def ln(v, name):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * t[f"{name}.weight"] + t[f"{name}.bias"]

    a, m = "cross_attend_blocks.0.", "cross_attend_blocks.1."
    q = ln(x, f"{a}norm") @ t[f"{a}fn.to_q.weight"].T
    k, v = np.split(ln(t["latents"], f"{a}norm_context") @ t[f"{a}fn.to_kv.weight"].T, 2, -1)
    B, L, _ = q.shape
    q = q.reshape(B, L, H, -1)
    k, v = k.reshape(len(k), H, -1), v.reshape(len(v), H, -1)
    s = np.einsum("blhe,rhe->bhlr", q, k) / math.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhlr,rhe->blhe", p, v).reshape(B, L, -1)
    x = x + o @ t[f"{a}fn.to_out.weight"].T
    value, gate = np.split(
        ln(x, f"{m}norm") @ t[f"{m}fn.net.0.weight"].T + t[f"{m}fn.net.0.bias"], 2, -1
    )
    gelu = 0.5 * gate * (1 + _erf(gate / math.sqrt(2)))
    x = x + (value * gelu) @ t[f"{m}fn.net.2.weight"].T + t[f"{m}fn.net.2.bias"]
    w = np.asarray(pool_mask, np.float64)[..., None]
    return (x * w).sum(1) / w.sum(1)
