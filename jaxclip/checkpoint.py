"""Orbax checkpoints: train state + config + metadata, in one step dir.

The data position needs no state of its own: the global data order makes step N's batch a
function of N (`data/global_order.py`), and the metadata carries the bad-record totals.

Saving is asynchronous (training continues while the arrays are written). Restoring takes
abstract targets carrying the *current* shardings, so a checkpoint written on 8 devices
restores on 4 or on 1: Orbax reads each shard where the new layout needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "checkpoints"


class Checkpointer:
    """Saves and restores training checkpoints under `<workdir>/checkpoints/<step>`."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        self._report_incomplete()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

    def _report_incomplete(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.iterdir()):
            if "tmp" in path.name:
                logging.warning("Ignoring incomplete checkpoint %s (a save was interrupted).", path)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        config_json: str,
        meta: dict,
        *,
        force: bool = False,
    ) -> bool:
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config_json)),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_json(self, step: int, name: str) -> dict:
        path = self.directory / str(step) / name / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} has no readable {name!r} ({e}). The "
                f"directory is corrupt or was not written by jaxclip: delete it "
                f"(rm -rf {self.directory / str(step)}) to fall back to an earlier step, or "
                f"use a fresh --workdir."
            ) from e

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `step` into the shapes/shardings of `abstract_state`; returns the state."""
        step_dir = self.directory / str(step)
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types; all mean "cannot use this step".
            raise CheckpointError(
                f"Could not restore checkpoint {step_dir}: {type(e).__name__}: {e}\n"
                f"Either it is corrupt (an interrupted copy, a deleted file) or it was saved "
                f"from a different model. Delete it (rm -rf {step_dir}) to resume from the "
                f"previous step, pass --step to pick another, or train in a fresh --workdir."
            ) from e
        return restored.state

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of `step`, from a train state or a params-only (imported) one.

        Leaves of `abstract_params` that carry a sharding are restored onto it; others come
        back as host numpy arrays. The optimizer state is never read.
        """

        def restore_args(leaf):
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
            return ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf.dtype)

        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(restore_args, target), partial_restore=True
        )
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:  # as in restore(): any failure means this step is unusable
            raise CheckpointError(
                f"Could not read the parameters of {self.directory / str(step)}: "
                f"{type(e).__name__}: {e}\nThe checkpoint is corrupt or holds another model."
            ) from e
        return restored.state["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings: a restore target that allocates nothing."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
