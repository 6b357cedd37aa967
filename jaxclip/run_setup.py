"""A run, built abstractly from its config: mesh, model kind, tokenizer, model graph, state
shardings, optimizer and the batch contract. Training, evaluation, `--aot`, `--dry_run` and
the benchmark all start here; nothing is allocated until `init_state`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxclip import mesh as mesh_lib
from jaxclip import model_kinds
from jaxclip.data.pipeline import make_tokenizer
from jaxclip.optim import decay_mask, frozen_patterns, make_optimizer, opt_state_specs
from jaxclip.tokenizer import Tokenizer


@dataclasses.dataclass
class RunSetup:
    """Everything a run needs, built abstractly (no parameter is allocated yet)."""

    cfg: ml_collections.ConfigDict
    mesh: Mesh
    kind: Any  # a model_kinds kind
    tokenizer: Tokenizer | None  # None for kinds without a text tower
    graphdef: Any
    abstract_state: dict  # {'step', 'params', 'opt_state'} of ShapeDtypeStructs
    state_shardings: dict
    tx: optax.GradientTransformation
    schedule: Any
    model_fn: Any
    batch_fields: dict[str, model_kinds.Field]

    def batch_shardings(self) -> dict:
        return {
            name: mesh_lib.batch_sharding(self.mesh, len(field.shape) + 1)
            for name, field in self.batch_fields.items()
        }

    def abstract_batch(self, global_batch: int | None = None) -> dict:
        """One global batch as ShapeDtypeStructs carrying their shardings."""
        b = self.cfg.data.batch_size if global_batch is None else global_batch
        shardings = self.batch_shardings()
        return {
            name: jax.ShapeDtypeStruct((b, *f.shape), f.dtype, sharding=shardings[name])
            for name, f in self.batch_fields.items()
        }

    def abstract_inputs(self) -> tuple[dict, dict]:
        """The train step's (state, batch) as ShapeDtypeStructs carrying their shardings."""
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )
        return state, self.abstract_batch()


def build(cfg: ml_collections.ConfigDict, devices=None) -> RunSetup:
    """Mesh, model graph, optimizer and state shardings from the config."""
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, devices)
    kind = model_kinds.get(cfg)
    tokenizer = make_tokenizer(cfg.data) if kind.uses_tokenizer else None

    def model_fn():
        return kind.build(cfg, tokenizer, nnx.Rngs(cfg.seed))

    abstract_model = nnx.eval_shape(model_fn)
    graphdef, abstract_vars = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(mesh_lib.state_specs(abstract_vars, dict(cfg.mesh.rules), mesh))
    abstract_params = nnx.to_pure_dict(abstract_vars)
    for message in replicated_dims(abstract_vars, dict(cfg.mesh.rules), mesh):
        logging.warning(message)
    tx, schedule = make_optimizer(
        cfg.optim, cfg.train.steps, decay_mask(abstract_vars), frozen_patterns(cfg)
    )
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Optimizer moments mirror the parameters' layout (frozen parameters have none); scalars
    # (counts) are replicated.
    opt_specs = opt_state_specs(abstract_opt, param_specs)
    specs = {"step": PartitionSpec(), "params": param_specs, "opt_state": opt_specs}
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    return RunSetup(
        cfg=cfg,
        mesh=mesh,
        kind=kind,
        tokenizer=tokenizer,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=mesh_lib.named(mesh, specs),
        tx=tx,
        schedule=schedule,
        model_fn=model_fn,
        batch_fields=model_kinds.batch_fields(cfg),
    )


def replicated_dims(state: nnx.State, rules: dict, mesh: Mesh) -> list[str]:
    """One line per parameter dimension whose rule names a mesh axis that does not divide
    it, so it is replicated there (more memory than the rules suggest)."""
    found = []
    for path, var in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        axes = var.get_metadata().get("logical_axes") or ()
        for name, dim in zip(axes, var.get_value().shape, strict=True):
            axis = rules.get(name)
            if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                found.append(
                    f"Parameter {where}: its {name!r} dimension ({dim}) is not divisible by "
                    f"mesh axis {axis!r} ({mesh.shape[axis]}), so it is replicated there."
                )
    return found


def init_state(setup: RunSetup, params: dict | None = None) -> dict:
    """Step 0, created already sharded (no full host copy exists): fresh parameters, or the
    given ones (already placed, e.g. `init.from`), and a fresh optimizer state for them."""

    def init(params):
        if params is None:
            params = nnx.to_pure_dict(nnx.state(setup.model_fn()))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": setup.tx.init(params),
        }

    shardings = setup.state_shardings
    in_shardings = (None,) if params is None else (shardings["params"],)
    return jax.jit(init, in_shardings=in_shardings, out_shardings=shardings)(params)


def synthetic_batch(setup: RunSetup, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global batch of random values that fit the contract (benchmarks, compile checks):
    uint8 pixels, token ids inside the vocabulary with a half-length mask, unit-ish floats."""
    b = setup.cfg.data.batch_size
    batch = {}
    for name, field in setup.batch_fields.items():
        shape = (b, *field.shape)
        if name == "mask":
            value = np.zeros(shape, field.dtype)
            value[:, : max(2, shape[1] // 2)] = 1
        elif field.dtype == np.uint8:
            value = rng.integers(0, 256, shape, dtype=np.uint8)
        elif np.issubdtype(field.dtype, np.integer):
            high = setup.tokenizer.vocab_size if setup.tokenizer is not None else 8
            value = rng.integers(0, high, shape).astype(field.dtype)
        else:
            value = rng.standard_normal(shape).astype(field.dtype)
        batch[name] = value
    if "mask" in batch and "tokens" in batch:
        batch["tokens"] = batch["tokens"] * batch["mask"]
    return batch
