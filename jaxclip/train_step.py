"""The train step: the model on a global batch, the global loss, one AdamW update.

The batch holds the fields of the run's batch contract (`model_kinds`): the image and the
kind's text fields, which go to the model as they are. The step is jitted with explicit
shardings, and the state is donated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxclip import losses, model_kinds
from jaxclip import mesh as mesh_lib
from jaxclip.data.transforms import normalize_images
from jaxclip.grad_cache import accumulated_value_and_grad
from jaxclip.models.build import compute_dtype
from jaxclip.optim import frozen_labels, frozen_patterns
from jaxclip.run_setup import RunSetup


def bounded_logit_scale(params: dict, max_log_scale: float) -> dict:
    """Clamps the log logit scale after an update (as open_clip does): a clamp inside the
    forward pass would give it a zero gradient above the bound, from which it never comes
    back."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.minimum(params["logit_scale"], max_log_scale)}


def make_train_step(setup: RunSetup):
    cfg, mesh, graphdef = setup.cfg, setup.mesh, setup.graphdef
    dtype = compute_dtype(cfg.model)
    text_fields = [name for name in setup.batch_fields if name != "image"]
    loss_kind = model_kinds.loss_kind(cfg)
    max_log_scale = math.log(cfg.model.max_logit_scale)
    rules = dict(cfg.mesh.rules)

    patterns = frozen_patterns(cfg)  # optim.frozen, and the logit scale if not learned
    frozen = frozen_labels(setup.abstract_state["params"], patterns) if patterns else None

    def embed(params, batch, rng):
        """The model on (a micro-batch of) the batch: per-example embeddings and scalars.
        Activations inside the towers are sharded by the mesh rules (ZeRO-3 under fsdp)."""
        if frozen is not None:  # locked towers: no gradient, so no backward pass through them
            params = jax.tree.map(
                lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                params,
                frozen,
            )
        model = nnx.merge(graphdef, params)
        images = normalize_images(batch["image"], dtype)
        with mesh_lib.activation_sharding(mesh, rules):
            return model(images, **{name: batch[name] for name in text_fields}, rng=rng)

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
        # Randomness (patch dropout) follows from the seed and the step: a resume replays it.
        # (With accumulation every micro-batch draws the same pattern, in both of its passes.)
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
        (_, metrics), grads = accumulated_value_and_grad(
            lambda params, micro: embed(params, micro, rng),
            objective,
            state["params"],
            batch,
            steps=cfg.train.accum_steps,
            mesh=mesh,
        )
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = bounded_logit_scale(optax.apply_updates(state["params"], updates), max_log_scale)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if cfg.train.skip_nonfinite:  # keep the state as it was; the loop logs the skip
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state["params"], state["opt_state"]),
            )
        lr = setup.schedule(state["step"])
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr, nonfinite=(~finite).astype(jnp.int32))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, setup.batch_shardings()),
        out_shardings=(setup.state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
