"""The metrics every loss reports, from global sums, with the same keys for every kind.

Each implementation returns the global sums named in `SUM_KEYS`; `finalize` turns them into
``i2t_top1``/``t2i_top1`` (top-1 retrieval among the global batch), ``pos_sim``/``neg_sim``
(mean cosine of matched and unmatched pairs), ``logit_scale`` and, when a bias is given,
``logit_bias``. None of them carries a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUM_KEYS = ("i2t_correct", "t2i_correct", "pos_dot", "all_dot")


def similarity_sums(u_local: jax.Array, v_local: jax.Array, v_sum: jax.Array) -> dict:
    """This device's share of sum_i u_i.v_i and of sum_i sum_j u_i.v_j (over local i).

    `v_sum` is the sum of every text embedding of the global batch: (sum_i u_i).(sum_j v_j)
    gives the mean negative similarity in O(D) instead of a B x B product.
    """
    return {
        "pos_dot": jnp.sum(u_local * v_local),
        "all_dot": jnp.dot(jnp.sum(u_local, axis=0), v_sum),
    }


def correct_count(predicted: jax.Array, first_label) -> jax.Array:
    """How many rows predicted their own pair (row r's label is first_label + r)."""
    labels = first_label + jnp.arange(predicted.shape[0], dtype=jnp.int32)
    return jnp.sum((predicted == labels).astype(jnp.float32))


def finalize(
    loss: jax.Array, sums: dict, batch: int, scale: jax.Array, bias: jax.Array | None
) -> dict[str, jax.Array]:
    """The metrics dict from the loss value and the global sums."""
    sg = jax.lax.stop_gradient
    n_neg = float(max(batch * batch - batch, 1))  # a Python int overflows int32 from B=46,341
    metrics = {
        "loss": loss,
        "i2t_top1": sg(sums["i2t_correct"] / batch),
        "t2i_top1": sg(sums["t2i_correct"] / batch),
        "logit_scale": sg(scale),
        "pos_sim": sg(sums["pos_dot"] / batch),
        "neg_sim": sg((sums["all_dot"] - sums["pos_dot"]) / n_neg),
    }
    if bias is not None:
        metrics["logit_bias"] = sg(bias)
    return metrics
