"""open_clip and OpenAI CLIP state dicts <-> jaxclip params.

open_clip keeps OpenAI's module names (``visual.transformer.resblocks.{i}.attn.in_proj_weight``
...), so one table serves both. Attention is ``nn.MultiheadAttention``: q, k and v share one
packed (3*width, width) ``in_proj_weight``; it is split before the table applies and packed
again on export. OpenAI's files also carry ``input_resolution``, ``context_length`` and
``vocab_size`` scalars, which are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from jaxclip.weights import mapping
from jaxclip.weights.architectures import ClipArchitecture, WeightsError
from jaxclip.weights.mapping import Rule, same, transpose

OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_QKV = ("q", "k", "v")


def _block_rules(prefix: str, tower: str, depth: int, heads: int) -> list[Rule]:
    block = f"{prefix}transformer.resblocks.{{i}}."
    q_in, q_in_t = mapping.heads_in(heads)
    b_in, b_in_t = mapping.heads_bias(heads)
    out, out_t = mapping.heads_out(heads)
    table = [
        ("ln_1.weight", "ln1_scale", same, same),
        ("ln_1.bias", "ln1_bias", same, same),
        *((f"attn.{n}_proj.weight", f"{n}_kernel", q_in, q_in_t) for n in _QKV),
        *((f"attn.{n}_proj.bias", f"{n}_bias", b_in, b_in_t) for n in _QKV),
        ("attn.out_proj.weight", "out_kernel", out, out_t),
        ("attn.out_proj.bias", "out_bias", same, same),
        ("ln_2.weight", "ln2_scale", same, same),
        ("ln_2.bias", "ln2_bias", same, same),
        ("mlp.c_fc.weight", "fc1_kernel", transpose, transpose),
        ("mlp.c_fc.bias", "fc1_bias", same, same),
        ("mlp.c_proj.weight", "fc2_kernel", transpose, transpose),
        ("mlp.c_proj.bias", "fc2_bias", same, same),
    ]
    return [Rule(block + src, (tower, "blocks", dst), f, g, depth) for src, dst, f, g in table]


def rules(arch: ClipArchitecture) -> list[Rule]:
    v = "visual."
    return [
        Rule(f"{v}conv1.weight", ("image", "patch_kernel"), *_patch),
        Rule(f"{v}class_embedding", ("image", "class_token"), same, same),
        Rule(f"{v}positional_embedding", ("image", "pos_embed"), same, same),
        Rule(f"{v}ln_pre.weight", ("image", "ln_pre", "scale"), same, same),
        Rule(f"{v}ln_pre.bias", ("image", "ln_pre", "bias"), same, same),
        *_block_rules(v, "image", arch.image_depth, arch.image_heads),
        Rule(f"{v}ln_post.weight", ("image", "ln_post", "scale"), same, same),
        Rule(f"{v}ln_post.bias", ("image", "ln_post", "bias"), same, same),
        Rule(f"{v}proj", ("image", "proj"), same, same),
        Rule("token_embedding.weight", ("text", "token_embed"), same, same),
        Rule("positional_embedding", ("text", "pos_embed"), same, same),
        *_block_rules("", "text", arch.text_depth, arch.text_heads),
        Rule("ln_final.weight", ("text", "ln_final", "scale"), same, same),
        Rule("ln_final.bias", ("text", "ln_final", "bias"), same, same),
        Rule("text_projection", ("text", "proj"), same, same),
        Rule("logit_scale", ("logit_scale",), same, same),
    ]


_patch = (mapping.conv_to_patch_kernel, mapping.patch_kernel_to_conv)


def _split_qkv(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        stem, _, leaf = key.rpartition("attn.in_proj_")
        if not stem:
            out[key] = value
            continue
        for name, part in zip(_QKV, np.split(np.asarray(value), 3, axis=0), strict=True):
            out[f"{stem}attn.{name}_proj.{leaf}"] = part
    return out


def _pack_qkv(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        stem, _, leaf = key.rpartition("attn.q_proj.")
        if stem:
            parts = [tensors[f"{stem}attn.{n}_proj.{leaf}"] for n in _QKV]
            out[f"{stem}attn.in_proj_{leaf}"] = np.concatenate(parts, axis=0)
        elif "attn.k_proj." not in key and "attn.v_proj." not in key:
            out[key] = value
    return out


def to_params(tensors: Mapping[str, np.ndarray], arch: ClipArchitecture) -> dict:
    tensors = {k: v for k, v in tensors.items() if k not in OPENAI_SCALARS and k != "attn_mask"}
    return mapping.to_params(_split_qkv(tensors), rules(arch), "open_clip/OpenAI")


def to_state_dict(params: Mapping, arch: ClipArchitecture) -> dict[str, np.ndarray]:
    return _pack_qkv(mapping.to_state_dict(params, rules(arch)))


def infer_architecture(tensors: Mapping[str, np.ndarray], act: str) -> ClipArchitecture:
    """The architecture from tensor shapes; heads follow open_clip's 64-wide heads."""
    try:
        width, _, patch, _ = tensors["visual.conv1.weight"].shape
        tokens = tensors["visual.positional_embedding"].shape[0]
        vocab, text_width = tensors["token_embedding.weight"].shape
        context = tensors["positional_embedding"].shape[0]
        embed_dim = tensors["text_projection"].shape[1]
        image_mlp = tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(
            f"cannot infer the architecture: no tensor {e.args[0]!r}, so this is not an "
            f"open_clip/OpenAI ViT CLIP state dict; pass --from hf for a Hugging Face directory"
        ) from None
    if width < 64 or text_width < 64:
        raise WeightsError(
            "cannot infer the number of attention heads of towers narrower than 64: pass "
            "--model with an open_clip name or config JSON"
        )
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise WeightsError(f"{tokens} image positions are not a class token plus a square grid")

    def depth(prefix: str) -> int:
        return len(
            {k.split(".")[len(prefix.split(".")) - 1] for k in tensors if k.startswith(prefix)}
        )

    return ClipArchitecture(
        embed_dim=int(embed_dim),
        image_size=int(grid * patch),
        patch=int(patch),
        image_width=int(width),
        image_depth=depth("visual.transformer.resblocks."),
        image_heads=int(width // 64),
        image_mlp=int(image_mlp),
        text_width=int(text_width),
        text_depth=depth("transformer.resblocks."),
        text_heads=int(text_width // 64),
        context_length=int(context),
        vocab_size=int(vocab),
        act=act,
    )
