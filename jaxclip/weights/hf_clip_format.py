"""Hugging Face ``transformers.CLIPModel`` state dicts <-> jaxclip params.

HF keeps q, k and v as separate Linear layers and stores the projections as bias-free Linear
weights (embed_dim, width), the transpose of OpenAI's matrices. Older checkpoints carry
``position_ids`` buffers, which are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxclip.weights import mapping
from jaxclip.weights.architectures import ClipArchitecture
from jaxclip.weights.mapping import Rule, same, transpose

_QKV = ("q", "k", "v")
_IGNORED_SUFFIXES = ("position_ids",)


def _block_rules(prefix: str, tower: str, depth: int, heads: int) -> list[Rule]:
    layer = f"{prefix}encoder.layers.{{i}}."
    q_in, q_in_t = mapping.heads_in(heads)
    b_in, b_in_t = mapping.heads_bias(heads)
    out, out_t = mapping.heads_out(heads)
    table = [
        ("layer_norm1.weight", "ln1_scale", same, same),
        ("layer_norm1.bias", "ln1_bias", same, same),
        *((f"self_attn.{n}_proj.weight", f"{n}_kernel", q_in, q_in_t) for n in _QKV),
        *((f"self_attn.{n}_proj.bias", f"{n}_bias", b_in, b_in_t) for n in _QKV),
        ("self_attn.out_proj.weight", "out_kernel", out, out_t),
        ("self_attn.out_proj.bias", "out_bias", same, same),
        ("layer_norm2.weight", "ln2_scale", same, same),
        ("layer_norm2.bias", "ln2_bias", same, same),
        ("mlp.fc1.weight", "fc1_kernel", transpose, transpose),
        ("mlp.fc1.bias", "fc1_bias", same, same),
        ("mlp.fc2.weight", "fc2_kernel", transpose, transpose),
        ("mlp.fc2.bias", "fc2_bias", same, same),
    ]
    return [Rule(layer + src, (tower, "blocks", dst), f, g, depth) for src, dst, f, g in table]


def rules(arch: ClipArchitecture) -> list[Rule]:
    v, t = "vision_model.", "text_model."
    patch = (mapping.conv_to_patch_kernel, mapping.patch_kernel_to_conv)
    return [
        Rule(f"{v}embeddings.patch_embedding.weight", ("image", "patch_kernel"), *patch),
        Rule(f"{v}embeddings.class_embedding", ("image", "class_token"), same, same),
        Rule(f"{v}embeddings.position_embedding.weight", ("image", "pos_embed"), same, same),
        Rule(f"{v}pre_layrnorm.weight", ("image", "ln_pre", "scale"), same, same),
        Rule(f"{v}pre_layrnorm.bias", ("image", "ln_pre", "bias"), same, same),
        *_block_rules(v, "image", arch.image_depth, arch.image_heads),
        Rule(f"{v}post_layernorm.weight", ("image", "ln_post", "scale"), same, same),
        Rule(f"{v}post_layernorm.bias", ("image", "ln_post", "bias"), same, same),
        Rule("visual_projection.weight", ("image", "proj"), transpose, transpose),
        Rule(f"{t}embeddings.token_embedding.weight", ("text", "token_embed"), same, same),
        Rule(f"{t}embeddings.position_embedding.weight", ("text", "pos_embed"), same, same),
        *_block_rules(t, "text", arch.text_depth, arch.text_heads),
        Rule(f"{t}final_layer_norm.weight", ("text", "ln_final", "scale"), same, same),
        Rule(f"{t}final_layer_norm.bias", ("text", "ln_final", "bias"), same, same),
        Rule("text_projection.weight", ("text", "proj"), transpose, transpose),
        Rule("logit_scale", ("logit_scale",), same, same),
    ]


def to_params(tensors: Mapping[str, np.ndarray], arch: ClipArchitecture) -> dict:
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    return mapping.to_params(tensors, rules(arch), "Hugging Face CLIPModel")


def to_state_dict(params: Mapping, arch: ClipArchitecture) -> dict[str, np.ndarray]:
    return mapping.to_state_dict(params, rules(arch))
