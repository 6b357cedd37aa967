"""Restore a saved step and run the configured evaluators on it (used by launch/eval.py)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from jaxclip import config as config_lib
from jaxclip import run_setup
from jaxclip.checkpoint import Checkpointer, CheckpointError, abstract_like
from jaxclip.evaluate import registry
from jaxclip.evaluate.encoders import run_encoders


def saved_config(
    workdir: str | Path, step: int | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """The config stored with `step` (default: the latest) of the run in `workdir`."""
    checkpointer = Checkpointer(workdir)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(
                f"No checkpoint in {Path(workdir) / 'checkpoints'}. Train first, e.g. "
                f"python launch/train.py --config demo --workdir {workdir}"
            )
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"No step {step} in {workdir}; saved steps: {steps}.")
        cfg = config_lib.from_dict(checkpointer.read_json(step, "config"))
    finally:
        checkpointer.close()
    return cfg, step


def evaluate_checkpoint(
    cfg: ml_collections.ConfigDict, workdir: str | Path, step: int, devices=None
) -> dict[str, float]:
    """Restores `step` onto the current devices (resharding) and evaluates it."""
    evaluators = registry.build_evaluators(cfg)  # a missing dataset fails before the restore
    setup = run_setup.build(cfg, devices)
    encoders = run_encoders(setup)  # LIFT: a store without these tasks' texts fails here
    checkpointer = Checkpointer(workdir)
    # Parameters only: a training step's optimizer state is not needed, an import has none.
    target = abstract_like(setup.abstract_state["params"], setup.state_shardings["params"])
    encoders.params = checkpointer.restore_params(step, target)
    checkpointer.close()
    return registry.run_all(evaluators, encoders)


def write_results(workdir: str | Path, step: int, results: dict[str, float]) -> Path:
    path = Path(workdir) / f"eval_step_{step}.json"
    path.write_text(json.dumps({"step": step, **results}, indent=2, sort_keys=True))
    return path


def format_table(results: dict[str, float]) -> str:
    rows = [(k, v) for k, v in sorted(results.items())]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v:.4f}" for k, v in rows)
