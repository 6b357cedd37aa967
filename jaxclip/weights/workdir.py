"""Imported weights as a jaxclip checkpoint, and the parameters of any jaxclip checkpoint.

An import writes step 0 of a workdir with the same Orbax layout as training (``state``,
``config``, ``meta`` items), but its state holds only ``params``: no ``step`` counter and no
optimizer moments. Moments depend on the optimizer a later run chooses (``optim.frozen``
changes which exist at all), so writing fresh ones would triple the files and pin a choice
that is not the import's to make. Evaluation reads only parameters
(``Checkpointer.restore_params``), and a new run starts from them with ``init.from``. The
meta item says ``params_only: true`` so a trainer can tell such a step from a resumable one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

import jaxclip
from jaxclip import config as config_lib
from jaxclip.checkpoint import Checkpointer, CheckpointError
from jaxclip.weights.architectures import WeightsError


def vocab_rows(cfg: ml_collections.ConfigDict) -> int:
    """Rows of the text embedding table the config builds (the tokenizer's size when 0)."""
    if cfg.model.kind != "clip" or cfg.model.text.vocab_size:
        return int(cfg.model.text.vocab_size)
    from jaxclip.data.pipeline import make_tokenizer

    return make_tokenizer(cfg.data).vocab_size


def abstract_params(cfg: ml_collections.ConfigDict) -> dict:
    """ShapeDtypeStructs of the params tree the config builds (nothing allocated)."""

    from jaxclip import model_kinds
    from jaxclip.data.pipeline import make_tokenizer

    kind = model_kinds.get(cfg)
    tokenizer = make_tokenizer(cfg.data) if kind.uses_tokenizer else None
    model = nnx.eval_shape(lambda: kind.build(cfg, tokenizer, nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_tokenizer_fits(cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """The configured tokenizer's ids must index the weights' embedding table."""
    from jaxclip.clip_tokenizer import VOCAB_SIZE
    from jaxclip.data.pipeline import make_tokenizer

    tokenizer_size = make_tokenizer(cfg.data).vocab_size
    clip_mismatch = cfg.data.tokenizer == "clip" and vocab_size != VOCAB_SIZE
    if tokenizer_size > vocab_size or clip_mismatch:
        raise WeightsError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {tokenizer_size} tokens but the "
            f"weights' text embedding has {vocab_size} rows: the ids would index the wrong "
            f"rows. Use the tokenizer the weights were trained with (CLIP's BPE, 49408 "
            f"tokens, is --config.data.tokenizer=clip)."
        )


def write_imported(
    workdir: str | Path, cfg: ml_collections.ConfigDict, params: dict, source: dict[str, Any]
) -> Path:
    """Step 0 of `workdir`: config + params only. Refuses a workdir that has checkpoints."""
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        if checkpointer.all_steps():
            raise WeightsError(
                f"{checkpointer.directory} already holds checkpoints "
                f"{checkpointer.all_steps()}; import into a new --output directory"
            )
        meta = {
            "jaxclip_version": jaxclip.__version__,
            "params_only": True,
            "imported_from": source,
            "tokenizer": cfg.data.tokenizer,
        }
        state = {"params": jax.tree.map(np.asarray, params)}
        checkpointer.save(0, state, config_lib.to_json(cfg), meta, force=True)
    finally:
        checkpointer.close()
    return checkpointer.directory / "0"


def read_params(
    workdir: str | Path, step: int | None = None, target: dict | None = None
) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(saved config, params, step) of a training run or an import; host numpy by default.

    `target`: abstract params (with shardings to restore onto devices); default: the saved
    config's own tree, as host arrays.
    """
    checkpointer = Checkpointer(workdir)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {checkpointer.directory}.")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"No step {step} in {workdir}; saved steps: {steps}.")
        cfg = config_lib.from_dict(checkpointer.read_json(step, "config"))
        target = abstract_params(cfg) if target is None else target
        params = checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()
    return cfg, params, step
