"""Training objectives for CLIP-family models: pure functions of embeddings and a mesh.

    loss, metrics = objective(image_emb, text_emb, scale, bias, mesh=mesh,
                              kind="contrastive" | "siglip" | "cosine" | "squared",
                              impl="gather" | "ring")

Kinds: ``contrastive`` is the global-batch InfoNCE of CLIP (`contrastive.py`); ``siglip`` the
pairwise sigmoid loss of SigLIP (`sigmoid.py`); ``cosine`` LIFT's loss without negatives
(`positive_pair_loss`); ``squared`` the squared loss on scaled similarities that Chen et al.
(2023) analyse (`squared.py`). Impls: ``gather`` all-gathers the embeddings, so its memory grows
with the global batch; ``ring`` passes them around the devices (`ring.py`), so it does not.
Both are exact: they agree within float32 rounding. docs/losses.md says which to choose.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxclip.losses.batch_axes import BATCH_AXES
from jaxclip.losses.contrastive import contrastive_loss
from jaxclip.losses.ring import LOSS_IMPLS, check_impl
from jaxclip.losses.sigmoid import sigmoid_loss
from jaxclip.losses.squared import squared_loss

__all__ = [
    "LOSS_IMPLS",
    "OBJECTIVE_KINDS",
    "contrastive_loss",
    "objective",
    "positive_pair_loss",
    "sigmoid_loss",
    "squared_loss",
]

OBJECTIVE_KINDS = ("contrastive", "siglip", "cosine", "squared")


def positive_pair_loss(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Mean over the global batch of ``1 - cos(u_i, v_i)`` for the positive pairs.

    Plain jnp, so it works on sharded global arrays under jit (XLA inserts the reduction).

    Used in two ways:
      * as a regulariser ``lambda * mean(1 - cos)`` added to the contrastive loss, which is our
        reading of the positive-pair regulariser of Chen et al. (2023); the paper's exact formula
        could not be confirmed, so treat this as an interpretation, not a reproduction;
      * as LIFT's cosine loss, i.e. the same term with the contrastive part switched off.

    The cosine is computed from the inputs (re-normalised with a small epsilon), so the gradient
    is that of the true cosine even if the inputs are only approximately unit length.
    """
    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    eps = 1e-12
    u_norm = jnp.sqrt(jnp.maximum(jnp.sum(u * u, axis=-1), eps))
    v_norm = jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1), eps))
    cos = jnp.sum(u * v, axis=-1) / (u_norm * v_norm)
    return jnp.mean(1.0 - cos)


def _check_objective(kind: str, positive_weight: float) -> None:
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; valid kinds are {OBJECTIVE_KINDS}")
    if positive_weight < 0:
        raise ValueError(f"positive_weight must be >= 0, got {positive_weight}")


def objective(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float | None = None,
    *,
    mesh: Mesh | None,
    kind: str = "contrastive",
    impl: str = "gather",
    positive_weight: float = 0.0,
    batch_axes: Sequence[str] = BATCH_AXES,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective selected by config (``loss.kind``, ``loss.impl``, ...).

    ``kind="contrastive"``: InfoNCE; ``kind="siglip"``: the sigmoid loss, which uses the bias;
    either plus ``positive_weight * positive_pair_loss`` when the weight is positive.
    ``kind="cosine"`` (LIFT): ``positive_pair_loss`` only; the InfoNCE metrics are still
    computed (on stop-gradient inputs) so runs of every kind log comparable numbers, and the
    scale and bias receive zero gradient. ``kind="squared"``: `squared_loss` (the bias is
    unused), plus the positive-pair term when weighted; its top-1 and similarity metrics are
    InfoNCE's (stop-gradient, with ``impl``), which share them.

    Returns ``(total, metrics)``. ``metrics["loss"]`` is the kind's own loss (InfoNCE for
    ``cosine``, for comparison), ``metrics["positive_pair"]`` the mean ``1 - cos`` of the
    positive pairs and ``metrics["total"]`` the optimised objective (the returned value).
    """
    _check_objective(kind, positive_weight)
    check_impl(impl)
    options = dict(mesh=mesh, batch_axes=batch_axes, chunk_size=chunk_size, impl=impl)
    pos = positive_pair_loss(image_emb, text_emb)

    if kind in ("cosine", "squared"):
        sg = jax.lax.stop_gradient
        sg_bias = None if bias is None else sg(jnp.asarray(bias, jnp.float32))
        _, metrics = contrastive_loss(
            sg(image_emb), sg(text_emb), sg(jnp.asarray(scale, jnp.float32)), sg_bias, **options
        )
        metrics = {k: sg(x) for k, x in metrics.items()}
        total = pos
        if kind == "squared":
            loss = squared_loss(image_emb, text_emb, scale, mesh=mesh, batch_axes=batch_axes)
            metrics["loss"] = loss
            total = loss + positive_weight * pos if positive_weight > 0 else loss
    else:
        loss_fn = sigmoid_loss if kind == "siglip" else contrastive_loss
        loss, metrics = loss_fn(image_emb, text_emb, scale, bias, **options)
        total = loss + positive_weight * pos if positive_weight > 0 else loss

    metrics = dict(metrics)
    metrics["positive_pair"] = jax.lax.stop_gradient(pos)
    metrics["total"] = jax.lax.stop_gradient(total)
    return total, metrics
