"""CLIP architectures: open_clip names, open_clip / HF configs and jaxclip configs, one dataclass.

``ClipArchitecture`` is the shape of a ViT CLIP in the terms every format shares (tower widths,
depths, heads, patch, image size, context, vocabulary, activation). Each format converts to and
from it, and so does a jaxclip config, so a conversion never goes from one format's names
straight to another's. An architecture jaxclip's towers cannot express (a text MLP other than
4x the width, a ViT whose dimensions match no variant in ``jaxclip.models.vit.VARIANTS``) is
refused with what would be needed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from jaxclip.models.vit import VARIANTS


class WeightsError(ValueError):
    """Weights that cannot be converted, with what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class ClipArchitecture:
    embed_dim: int
    image_size: int
    patch: int
    image_width: int
    image_depth: int
    image_heads: int
    image_mlp: int
    text_width: int
    text_depth: int
    text_heads: int
    context_length: int
    vocab_size: int
    act: str = "gelu"  # "gelu" (exact, open_clip's default) or "quick_gelu" (OpenAI's)

    @property
    def text_mlp(self) -> int:
        return 4 * self.text_width

    def replace(self, **changes: Any) -> ClipArchitecture:
        return dataclasses.replace(self, **changes)


_B = dict(image_width=768, image_depth=12, image_heads=12, image_mlp=3072)
_L = dict(image_width=1024, image_depth=24, image_heads=16, image_mlp=4096)
_TEXT_B = dict(text_width=512, text_depth=12, text_heads=8, context_length=77, vocab_size=49408)
_TEXT_L = dict(text_width=768, text_depth=12, text_heads=12, context_length=77, vocab_size=49408)
# open_clip's names (its model_configs/*.json); "-quickgelu" selects OpenAI's activation.
NAMED: dict[str, ClipArchitecture] = {
    "ViT-B-32": ClipArchitecture(512, 224, 32, **_B, **_TEXT_B),
    "ViT-B-16": ClipArchitecture(512, 224, 16, **_B, **_TEXT_B),
    "ViT-L-14": ClipArchitecture(768, 224, 14, **_L, **_TEXT_L),
    "ViT-L-14-336": ClipArchitecture(768, 336, 14, **_L, **_TEXT_L),
}


def named_architecture(name: str) -> ClipArchitecture:
    base, quick = name.removesuffix("-quickgelu"), name.endswith("-quickgelu")
    if base not in NAMED:
        raise WeightsError(_unknown_name_message(name))
    return NAMED[base].replace(act="quick_gelu" if quick else "gelu")


def _unknown_name_message(name: str) -> str:
    names = ", ".join(f"{n}[-quickgelu]" for n in NAMED)
    return (
        f"unsupported architecture {name!r}: jaxclip converts {names}, or any ViT CLIP given "
        f"as an open_clip config JSON (--model path/to/open_clip_config.json)"
    )


def name_of(arch: ClipArchitecture) -> str | None:
    """The open_clip name of `arch`, if it has one."""
    for name, known in NAMED.items():
        if known.replace(act=arch.act) == arch:
            return name + ("-quickgelu" if arch.act == "quick_gelu" else "")
    return None


# ---------------------------------------------------------------------------------------------
# open_clip model configs (model_configs/*.json, open_clip_config.json's "model_cfg")
# ---------------------------------------------------------------------------------------------

# Options that change the computation in ways jaxclip's towers do not implement.
_OPEN_CLIP_UNSUPPORTED = {
    "vision_cfg": dict(
        ls_init_value=None,
        attentional_pool=False,
        no_ln_pre=False,
        final_ln_after_pool=False,
        pool_type="tok",
        timm_model_name=None,
        hf_model_name=None,
    ),
    "text_cfg": dict(
        ls_init_value=None,
        embed_cls=False,
        no_causal_mask=False,
        final_ln_after_pool=False,
        proj_bias=False,
        hf_model_name=None,
    ),
}


def from_open_clip_config(model_cfg: dict) -> ClipArchitecture:
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for section, defaults in _OPEN_CLIP_UNSUPPORTED.items():
        for key, default in defaults.items():
            value = model_cfg.get(section, {}).get(key, default)
            if value != default:
                raise WeightsError(
                    f"unsupported architecture: open_clip option {section}.{key}={value!r} "
                    f"has no counterpart in jaxclip's towers (only {default!r} is supported)"
                )
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise WeightsError(
            f"unsupported architecture: text pool_type {text['pool_type']!r}; jaxclip pools the "
            f"end-of-text token ('argmax' or 'eos')"
        )
    if isinstance(vision.get("layers", 12), list | tuple):
        raise WeightsError("unsupported architecture: ResNet image towers (jaxclip has ViTs)")
    width = int(vision.get("width", 768))
    text_width = int(text.get("width", 512))
    if float(text.get("mlp_ratio", 4.0)) != 4.0:
        raise WeightsError(_text_mlp_message(text_width, text_width * text["mlp_ratio"]))
    return _checked(
        ClipArchitecture(
            embed_dim=int(model_cfg["embed_dim"]),
            image_size=int(vision.get("image_size", 224)),
            patch=int(vision.get("patch_size", 16)),
            image_width=width,
            image_depth=int(vision.get("layers", 12)),
            image_heads=width // int(vision.get("head_width", 64)),
            image_mlp=int(width * float(vision.get("mlp_ratio", 4.0))),
            text_width=text_width,
            text_depth=int(text.get("layers", 12)),
            text_heads=int(text.get("heads", 8)),
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
            act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        )
    )


def to_open_clip_config(arch: ClipArchitecture, eos_id: int | None = None) -> dict:
    """open_clip's model_cfg; `eos_id` pools at that token instead of the largest id."""
    text_cfg: dict[str, Any] = dict(
        context_length=arch.context_length,
        vocab_size=arch.vocab_size,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_depth,
    )
    if eos_id is not None:
        text_cfg.update(pool_type="eos", eos_id=int(eos_id))
    return dict(
        embed_dim=arch.embed_dim,
        quick_gelu=arch.act == "quick_gelu",
        vision_cfg=dict(
            image_size=arch.image_size,
            layers=arch.image_depth,
            width=arch.image_width,
            head_width=arch.image_width // arch.image_heads,
            mlp_ratio=arch.image_mlp / arch.image_width,
            patch_size=arch.patch,
        ),
        text_cfg=text_cfg,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face CLIPConfig (config.json)
# ---------------------------------------------------------------------------------------------

_HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


def from_hf_config(config: dict) -> ClipArchitecture:
    if config.get("model_type", "clip") != "clip":
        raise WeightsError(
            f"unsupported architecture: model_type {config.get('model_type')!r}; jaxclip reads "
            f"Hugging Face CLIPModel directories (model_type 'clip')"
        )
    text, vision = config["text_config"], config["vision_config"]
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_HF_ACTS):
        raise WeightsError(
            f"unsupported architecture: activations {sorted(acts)}; jaxclip's towers share one "
            f"activation, 'gelu' or 'quick_gelu'"
        )
    if text["intermediate_size"] != 4 * text["hidden_size"]:
        raise WeightsError(_text_mlp_message(text["hidden_size"], text["intermediate_size"]))
    return _checked(
        ClipArchitecture(
            embed_dim=int(config.get("projection_dim", 512)),
            image_size=int(vision["image_size"]),
            patch=int(vision["patch_size"]),
            image_width=int(vision["hidden_size"]),
            image_depth=int(vision["num_hidden_layers"]),
            image_heads=int(vision["num_attention_heads"]),
            image_mlp=int(vision["intermediate_size"]),
            text_width=int(text["hidden_size"]),
            text_depth=int(text["num_hidden_layers"]),
            text_heads=int(text["num_attention_heads"]),
            context_length=int(text["max_position_embeddings"]),
            vocab_size=int(text["vocab_size"]),
            act=acts.pop(),
        )
    )


def to_hf_config(arch: ClipArchitecture, *, bos_id: int, eos_id: int, pad_id: int) -> dict:
    act = _HF_ACTS[arch.act]
    return dict(
        architectures=["CLIPModel"],
        model_type="clip",
        projection_dim=arch.embed_dim,
        logit_scale_init_value=math.log(1 / 0.07),
        dtype="float32",
        text_config=dict(
            model_type="clip_text_model",
            vocab_size=arch.vocab_size,
            hidden_size=arch.text_width,
            intermediate_size=arch.text_mlp,
            num_hidden_layers=arch.text_depth,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.context_length,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=arch.embed_dim,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=arch.image_width,
            intermediate_size=arch.image_mlp,
            num_hidden_layers=arch.image_depth,
            num_attention_heads=arch.image_heads,
            image_size=arch.image_size,
            patch_size=arch.patch,
            num_channels=3,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=arch.embed_dim,
        ),
    )


# ---------------------------------------------------------------------------------------------
# jaxclip configs
# ---------------------------------------------------------------------------------------------


def _variant_name(arch: ClipArchitecture) -> str:
    dims = (arch.image_width, arch.image_depth, arch.image_heads, arch.image_mlp)
    for name, known in VARIANTS.items():
        if known == dims:
            return f"{name}/{arch.patch}"
    table = ", ".join(f"{n}={v}" for n, v in VARIANTS.items())
    raise WeightsError(
        f"unsupported architecture: an image tower of (width, depth, heads, mlp) = {dims} "
        f"matches no jaxclip ViT variant ({table})"
    )


def _text_mlp_message(width: int, mlp: float) -> str:
    return (
        f"unsupported architecture: a text MLP of {mlp:g} for width {width}; jaxclip's text "
        f"tower uses 4 x width"
    )


def _checked(arch: ClipArchitecture) -> ClipArchitecture:
    _variant_name(arch)
    if arch.image_size % arch.patch:
        raise WeightsError(f"image size {arch.image_size} is not a multiple of the patch")
    if arch.text_width % arch.text_heads:
        raise WeightsError(f"text width {arch.text_width} not divisible by {arch.text_heads}")
    return arch


def apply_to_config(arch: ClipArchitecture, cfg: ml_collections.ConfigDict) -> None:
    """Set the model and data keys of `cfg` that describe `arch` (a CLIP two-tower model)."""
    with cfg.unlocked():
        m = cfg.model
        m.kind = "clip"
        m.embed_dim = arch.embed_dim
        m.act = arch.act
        m.image.variant = _variant_name(arch)
        m.image.pool = "cls"
        m.text.width, m.text.depth, m.text.heads = arch.text_width, arch.text_depth, arch.text_heads
        m.text.context_length = arch.context_length
        m.text.vocab_size = arch.vocab_size
        cfg.data.image_size = arch.image_size
        cfg.data.context_length = arch.context_length


def from_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> ClipArchitecture:
    """The architecture a jaxclip CLIP config builds (`vocab_size`: its embedding rows)."""
    if cfg.model.kind != "clip":
        raise WeightsError(
            f"model.kind={cfg.model.kind!r} cannot be exported: open_clip and Hugging Face "
            f"CLIPModel hold a two-tower CLIP, and a LIFT model has no text tower of its own "
            f"(its head maps into a frozen encoder's space). Export a model.kind='clip' run."
        )
    if cfg.model.image.pool != "cls":
        raise WeightsError("only class-token pooling (model.image.pool='cls') can be exported")
    from jaxclip.models.vit import decode_variant

    vit = decode_variant(cfg.model.image.variant)
    return ClipArchitecture(
        embed_dim=cfg.model.embed_dim,
        image_size=cfg.data.image_size,
        patch=vit["patch"],
        image_width=vit["width"],
        image_depth=vit["depth"],
        image_heads=vit["heads"],
        image_mlp=vit["mlp_dim"],
        text_width=cfg.model.text.width,
        text_depth=cfg.model.text.depth,
        text_heads=cfg.model.text.heads,
        context_length=cfg.model.text.context_length,
        vocab_size=vocab_size,
        act=cfg.model.act,
    )
