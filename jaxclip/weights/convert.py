"""Import open_clip / OpenAI / Hugging Face CLIP weights into a jaxclip workdir; export back.

    import: file or directory -> (architecture, params) -> checks -> workdir step 0
    export: workdir step -> (config, params) -> open_clip directory | HF CLIPModel directory

``launch/convert_weights.py`` is the command line over these functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxclip import clip_tokenizer
from jaxclip import config as config_lib
from jaxclip.data.pipeline import make_tokenizer
from jaxclip.data.transforms import CLIP_MEAN, CLIP_STD
from jaxclip.tokenizer import EOT
from jaxclip.weights import architectures as arch_lib
from jaxclip.weights import files, hf_clip_format, open_clip_format
from jaxclip.weights import workdir as workdir_lib
from jaxclip.weights.architectures import ClipArchitecture, WeightsError
from jaxclip.weights.mapping import check_shapes
from jaxclip.weights.pos_embed import adapt_image_size

IMPORT_FORMATS = ("open_clip", "openai", "hf")
EXPORT_FORMATS = ("open_clip", "hf")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_SPECIALS = {clip_tokenizer.SOT: "<|startoftext|>", clip_tokenizer.EOT: "<|endoftext|>"}


@dataclasses.dataclass
class Foreign:
    """Weights read from another library's files, in jaxclip's params layout."""

    arch: ClipArchitecture
    params: dict
    source: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def read_foreign(
    fmt: str, path: str | Path, model: str | ClipArchitecture | None = None
) -> Foreign:
    """The weights at `path` as jaxclip params; `model`: an open_clip name, config JSON path
    or architecture (open_clip/OpenAI files; default: the directory's config, or inferred)."""
    if fmt not in IMPORT_FORMATS:
        raise WeightsError(f"--from must be one of {IMPORT_FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"--input {path} does not exist")
    if fmt == "hf":
        arch, tensors = _read_hf(path, model)
        params = hf_clip_format.to_params(tensors, arch)
    else:
        tensors = files.read_directory(path) if path.is_dir() else files.read_state_dict(path)
        arch = _open_clip_architecture(fmt, path, model, tensors)
        params = open_clip_format.to_params(tensors, arch)
    source = dict(format=fmt, input=str(path), architecture=arch_lib.name_of(arch) or "custom")
    return Foreign(arch, params, source)


def _read_hf(path: Path, model: str | ClipArchitecture | None) -> tuple[ClipArchitecture, dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path} is not a Hugging Face model directory (no config.json)")
    if model is not None:
        raise WeightsError(
            "--model is for open_clip/OpenAI files; HF directories carry config.json"
        )
    arch = arch_lib.from_hf_config(json.loads(config_file.read_text()))
    return arch, files.read_directory(path)


def _open_clip_architecture(
    fmt: str, path: Path, model: str | ClipArchitecture | None, tensors: dict
) -> ClipArchitecture:
    default_act = "quick_gelu" if fmt == "openai" else "gelu"
    if model is None and path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        model = str(path / OPEN_CLIP_CONFIG)
    if model is None:
        arch = open_clip_format.infer_architecture(tensors, default_act)
        logging.warning(
            "Architecture inferred from the tensors (%s, activation %s: the weights do not "
            "record it; pass --model NAME-quickgelu or NAME to choose).",
            arch_lib.name_of(arch) or "custom",
            arch.act,
        )
        return arch
    if isinstance(model, ClipArchitecture):
        arch = model
    elif model.endswith(".json"):
        arch = arch_lib.from_open_clip_config(json.loads(Path(model).read_text()))
    else:
        arch = arch_lib.named_architecture(model)
        if fmt == "openai" and not model.endswith("-quickgelu"):
            arch = arch.replace(act="quick_gelu")  # OpenAI trained every CLIP with QuickGELU
    # The image size is the checkpoint's (e.g. ViT-L-14 weights at 336 px).
    rows = tensors.get("visual.positional_embedding")
    if rows is not None:
        arch = arch.replace(image_size=math.isqrt(rows.shape[0] - 1) * arch.patch)
    return arch


def imported_config(
    arch: ClipArchitecture, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """A jaxclip config for `arch`: `base` (default: base_config) with the model keys set."""
    cfg = config_lib.base_config() if base is None else ml_collections.ConfigDict(base.to_dict())
    with cfg.unlocked():
        cfg.name = cfg.name or "imported"
        if arch.vocab_size == clip_tokenizer.VOCAB_SIZE and cfg.data.tokenizer == "shapes":
            cfg.data.tokenizer = "clip"
    arch_lib.apply_to_config(arch, cfg)
    cfg.lock()
    return cfg


def import_weights(
    fmt: str,
    path: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    base: ml_collections.ConfigDict | None = None,
    image_size: int | None = None,
) -> Path:
    """Convert `path` and write it as step 0 of the workdir `output`; returns the step dir."""
    foreign = read_foreign(fmt, path, model)
    arch, params = foreign.arch, foreign.params
    if image_size and image_size != arch.image_size:
        arch = arch.replace(image_size=image_size)
        params = adapt_image_size(params, (image_size // arch.patch) ** 2 + 1)
    cfg = imported_config(arch, base)
    workdir_lib.check_tokenizer_fits(cfg, arch.vocab_size)
    check_shapes(params, workdir_lib.abstract_params(cfg))
    return workdir_lib.write_imported(output, cfg, params, foreign.source)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_weights(
    fmt: str, workdir: str | Path, output: str | Path, step: int | None = None
) -> Path:
    """Write step `step` (default: latest) of `workdir` in format `fmt` to the directory."""
    if fmt not in EXPORT_FORMATS:
        raise WeightsError(f"--to must be one of {EXPORT_FORMATS}, got {fmt!r}")
    cfg, params, step = workdir_lib.read_params(workdir, step)
    arch = arch_lib.from_config(cfg, workdir_lib.vocab_rows(cfg))
    if cfg.model.logit_bias is not None:
        raise WeightsError(
            "a model with a logit bias (SigLIP-style) has no CLIPModel counterpart; "
            "export supports CLIP's logit scale only"
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(cfg.data)
    if fmt == "open_clip":
        _write_open_clip(output, arch, params, tokenizer)
    else:
        _write_hf(output, arch, params, tokenizer)
    return output


def _eos_id(tokenizer) -> int | None:
    """The end-of-text id when it is not the largest id (then pooling must name it)."""
    if isinstance(tokenizer, clip_tokenizer.ClipTokenizer):
        return None
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise WeightsError("the run's tokenizer has no end-of-text token; pooling needs one")
    return eot


def _write_open_clip(output: Path, arch: ClipArchitecture, params: dict, tokenizer) -> None:
    files.write_safetensors(
        open_clip_format.to_state_dict(params, arch), output / OPEN_CLIP_WEIGHTS
    )
    preprocess = dict(
        size=arch.image_size,
        mean=list(CLIP_MEAN),
        std=list(CLIP_STD),
        interpolation="bicubic",
        resize_mode="shortest",
    )
    model_cfg = arch_lib.to_open_clip_config(arch, eos_id=_eos_id(tokenizer))
    files.write_json(
        dict(model_cfg=model_cfg, preprocess_cfg=preprocess), output / OPEN_CLIP_CONFIG
    )
    if not isinstance(tokenizer, clip_tokenizer.ClipTokenizer):
        tokenizer.to_file(output / "tokenizer.json")  # open_clip's own tokenizer would differ


def _write_hf(output: Path, arch: ClipArchitecture, params: dict, tokenizer) -> None:
    files.write_safetensors(
        hf_clip_format.to_state_dict(params, arch), output / "model.safetensors"
    )
    is_clip = isinstance(tokenizer, clip_tokenizer.ClipTokenizer)
    if is_clip:
        ids = dict(bos_id=tokenizer.sot_id, eos_id=tokenizer.eot_id, pad_id=tokenizer.eot_id)
    else:
        sot = tokenizer.token_to_id("<sot>")
        ids = dict(bos_id=sot, eos_id=_eos_id(tokenizer), pad_id=tokenizer.pad_id)
    files.write_json(arch_lib.to_hf_config(arch, **ids), output / "config.json")
    size = arch.image_size
    files.write_json(
        dict(
            image_processor_type="CLIPImageProcessor",
            do_resize=True,
            size=dict(shortest_edge=size),
            resample=3,  # bicubic
            do_center_crop=True,
            crop_size=dict(height=size, width=size),
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            do_convert_rgb=True,
        ),
        output / "preprocessor_config.json",
    )
    if is_clip:
        _write_hf_clip_tokenizer(output, arch.context_length)
    else:
        tokenizer.to_file(output / "tokenizer.json")
        config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=size)
        files.write_json(config, output / "tokenizer_config.json")


def _write_hf_clip_tokenizer(output: Path, context_length: int) -> None:
    """vocab.json + merges.txt: transformers builds its CLIPTokenizer (same ids) from them."""
    vocab = json.loads(clip_tokenizer.clip_bpe_json())["model"]["vocab"]
    vocab = {HF_SPECIALS.get(token, token): i for token, i in vocab.items()}
    files.write_json(vocab, output / "vocab.json")
    merges = [" ".join(m) for m in clip_tokenizer.load_merges()]
    (output / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    files.write_json(
        dict(
            tokenizer_class="CLIPTokenizer",
            bos_token=HF_SPECIALS[clip_tokenizer.SOT],
            eos_token=HF_SPECIALS[clip_tokenizer.EOT],
            pad_token=HF_SPECIALS[clip_tokenizer.EOT],
            unk_token=HF_SPECIALS[clip_tokenizer.EOT],
            model_max_length=context_length,
            do_lower_case=True,
        ),
        output / "tokenizer_config.json",
    )


def params_equal(a: dict, b: dict) -> bool:
    """Bit-exact equality of two params trees (for round-trip checks)."""
    import jax

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )
