"""The train step: the model on a global batch, the global loss, one AdamW update.

The batch holds the fields of the run's batch contract (`model_kinds`): the image and the
kind's text fields, which go to the model as they are. The step is jitted with explicit
shardings, and the state is donated.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jaxclip import losses, model_kinds
from jaxclip import mesh as mesh_lib
from jaxclip.data.transforms import normalize_images
from jaxclip.grad_cache import accumulated_value_and_grad
from jaxclip.models.build import compute_dtype
from jaxclip.run_setup import RunSetup


def make_train_step(setup: RunSetup):
    cfg, mesh, graphdef = setup.cfg, setup.mesh, setup.graphdef
    dtype = compute_dtype(cfg.model)
    text_fields = [name for name in setup.batch_fields if name != "image"]
    loss_kind = model_kinds.loss_kind(cfg)

    def embed(params, batch):
        """The model on (a micro-batch of) the batch: per-example embeddings and scalars."""
        model = nnx.merge(graphdef, params)
        images = normalize_images(batch["image"], dtype)
        return model(images, **{name: batch[name] for name in text_fields})

    def objective(out):
        return losses.objective(
            out["image"],
            out["text"],
            out["scale"],
            out["bias"],
            mesh=mesh,
            kind=loss_kind,
            impl=cfg.loss.impl,
            positive_weight=cfg.loss.positive_weight,
            chunk_size=cfg.loss.chunk_size or None,
        )

    def train_step(state, batch):
        # train.accum_steps > 1: the gradient cache, so the update is that of the whole
        # batch, every negative included, with one micro-batch's activations in memory.
        (_, metrics), grads = accumulated_value_and_grad(
            embed, objective, state["params"], batch, steps=cfg.train.accum_steps, mesh=mesh
        )
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, setup.batch_shardings()),
        out_shardings=(setup.state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
