"""Tiny configs for tests: the demo's structure at a size that trains in seconds."""

from __future__ import annotations

from jaxclip import config as config_lib


def tiny_config(**overrides) -> config_lib.ml_collections.ConfigDict:
    """The demo config shrunk: 32 px images, 2-layer towers of width 32, batch 16."""
    cfg = config_lib.load_config("demo")
    values = {
        "model.image.variant": "mu/8",
        "model.embed_dim": "32",
        "model.text.width": "32",
        "model.text.depth": "1",
        "model.text.heads": "2",
        "model.text.context_length": "16",
        "data.context_length": "16",
        "data.image_size": "32",
        "data.batch_size": "16",
        "data.worker_count": "0",
        "data.shapes.num_train": "4096",
        "data.shapes.num_eval": "64",
        "optim.warmup_steps": "2",
        "train.steps": "4",
        "train.log_every": "1",
        "train.eval_every": "1000000",
        "train.checkpoint_every": "2",
        "eval.num_examples": "64",
        "eval.batch_size": "64",
        "eval.tasks": "()",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    config_lib.apply_overrides(cfg, values.items())
    return cfg
