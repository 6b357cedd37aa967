"""Training objectives for CLIP-family models: global-batch InfoNCE and a positive-pair cosine term.

Math
----
Let ``u_i`` and ``v_i`` (i = 1..B) be the L2-normalised image and text embeddings of the GLOBAL
batch, ``s`` the (already exponentiated and clamped) logit scale and ``b`` an optional bias. The
logits are ``Z_ij = s * u_i . v_j + b`` and the symmetric InfoNCE (CLIP) loss is::

    L = -1/(2B) * sum_i [ log softmax_j(Z_ij)[i] + log softmax_j(Z_ji)[i] ]
      =  1/(2B) * sum_i [ lse_j(Z_ij) + lse_j(Z_ji) - 2 Z_ii ]

The first term classifies each image among all texts (rows of Z), the second each text among all
images (columns of Z). Because softmax is shift invariant a scalar bias cancels in both terms: it
is accepted so that callers can pass the same (scale, bias) pair to every objective, but it has no
effect on this loss and receives zero gradient.

Memory
------
The naive implementation gathers all embeddings and materialises the full B x B logit matrix on
every device. Here each device only ever forms the logits of its OWN rows: with local batch
``b = B / n_devices`` it all-gathers U and V (B x D each, cheap), computes its b x B block of
image->text logits (local images against all texts) and its b x B block of text->image logits
(local texts against all images), reduces them to per-row log-sum-exps and psums the scalar sums
over the batch axes. Peak logits memory is O(b * B) per device instead of O(B^2). With
``chunk_size`` the columns are visited ``chunk_size`` at a time inside ``jax.lax.scan`` with an
online (running-max) log-sum-exp, and the scan body is rematerialised, so the peak drops to
O(b * chunk_size) in both the forward and the backward pass.

Gradients
---------
Gradients flow through two paths: directly into a device's local rows, and through the
``all_gather`` whose transpose is a reduce-scatter (``psum_scatter``), which returns to each device
the contributions that every other device's logits made to its rows. The scalar ``scale`` is
replicated; shard_map's transpose inserts the psum that sums its per-device gradient. No explicit
collective appears in the backward code: JAX derives it from the forward collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

OBJECTIVE_KINDS = ("contrastive", "cosine")

# Names of the per-device partial sums that are psum'ed into global metrics.
_SUM_KEYS = ("lse_i2t", "lse_t2i", "pos_logit", "i2t_correct", "t2i_correct", "pos_dot", "all_dot")


def _row_lse_argmax_full(
    rows: jax.Array, cols: jax.Array, scale: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Row log-sum-exp and argmax of ``scale * rows @ cols.T + bias`` (materialises the block)."""
    logits = scale * (rows @ cols.T)
    if bias is not None:
        logits = logits + bias
    return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)


def _row_lse_argmax_chunked(
    rows: jax.Array,
    cols: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Same as ``_row_lse_argmax_full`` but only a (rows, chunk_size) block exists at a time."""
    n_cols, dim = cols.shape
    n_chunks = n_cols // chunk_size
    col_chunks = cols.reshape(n_chunks, chunk_size, dim)

    def block(chunk: jax.Array) -> jax.Array:
        logits = scale * (rows @ chunk.T)
        return logits + bias if bias is not None else logits

    # The carry is initialised from the first chunk rather than from constants: inside shard_map
    # with check_vma the carry's varying-axes type must match the body's output, and values
    # derived from the data have the right type by construction (and no -inf appears anywhere).
    first = block(col_chunks[0])
    # The running max is only a numerical shift; lse = m + log(sum exp(x - m)) has the exact
    # softmax gradient when m is treated as a constant, so stop its gradient.
    m0 = jax.lax.stop_gradient(jnp.max(first, axis=-1))
    s0 = jnp.sum(jnp.exp(first - m0[:, None]), axis=-1)
    best0 = jnp.max(first, axis=-1)
    arg0 = jnp.argmax(first, axis=-1).astype(jnp.int32)

    # Rematerialise the body so the backward pass stores only the small per-step carries, not the
    # (rows, chunk_size) logits of every step (which would add up to rows x n_cols again).
    @partial(jax.checkpoint, prevent_cse=False)
    def body(carry, xs):
        m, s, best, arg = carry
        chunk, start = xs
        logits = block(chunk)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
        chunk_best = jnp.max(logits, axis=-1)
        chunk_arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) + start
        # Strict '>' keeps the earliest index on ties, matching jnp.argmax over the full row.
        take = chunk_best > best
        return (m_new, s, jnp.where(take, chunk_best, best), jnp.where(take, chunk_arg, arg)), None

    starts = jnp.arange(1, n_chunks, dtype=jnp.int32) * chunk_size
    (m, s, _, arg), _ = jax.lax.scan(body, (m0, s0, best0, arg0), (col_chunks[1:], starts))
    return m + jnp.log(s), arg


def _local_sums(
    u_loc: jax.Array,
    v_loc: jax.Array,
    u_all: jax.Array,
    v_all: jax.Array,
    offset: jax.Array | int,
    scale: jax.Array,
    bias: jax.Array | None,
    chunk_size: int | None,
) -> dict[str, jax.Array]:
    """Per-device partial sums for the loss and metrics (global = sum over devices)."""
    if chunk_size is None:
        row_fn = _row_lse_argmax_full
    else:
        row_fn = partial(_row_lse_argmax_chunked, chunk_size=chunk_size)
    lse_i2t, arg_i2t = row_fn(u_loc, v_all, scale, bias)  # local images vs all texts
    lse_t2i, arg_t2i = row_fn(v_loc, u_all, scale, bias)  # local texts vs all images
    # The positive logit Z_ii is the same in both directions and only needs the local rows.
    pos_dot = jnp.sum(u_loc * v_loc, axis=-1)
    pos_logit = scale * pos_dot + (bias if bias is not None else 0.0)
    labels = offset + jnp.arange(u_loc.shape[0], dtype=jnp.int32)
    return {
        "lse_i2t": jnp.sum(lse_i2t),
        "lse_t2i": jnp.sum(lse_t2i),
        "pos_logit": jnp.sum(pos_logit),
        "i2t_correct": jnp.sum((arg_i2t == labels).astype(jnp.float32)),
        "t2i_correct": jnp.sum((arg_t2i == labels).astype(jnp.float32)),
        "pos_dot": jnp.sum(pos_dot),
        # sum_i sum_j u_i . v_j over local i and all j, computed as (sum_i u_i) . (sum_j v_j)
        # so the mean negative similarity costs O(D) instead of a B x B product.
        "all_dot": jnp.dot(jnp.sum(u_loc, axis=0), jnp.sum(v_all, axis=0)),
    }


def _finalize(
    sums: dict[str, jax.Array], batch: int, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Turn global partial sums into the loss and metrics dict."""
    loss = (sums["lse_i2t"] + sums["lse_t2i"] - 2.0 * sums["pos_logit"]) / (2.0 * batch)
    # Metrics are for logging only; keep them out of the gradient.
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
    return loss, metrics


def _resolve_batch_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    axes = tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not axes of the mesh {mesh.axis_names}")
    if not axes:
        raise ValueError("batch_axes must name at least one mesh axis")
    return axes


def contrastive_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float | None = None,
    *,
    mesh: Mesh | None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch, sharded so no device holds the B x B logits.

    Args:
      image_emb, text_emb: (B, D) L2-normalised global arrays, sharded over ``batch_axes``
        (replicated over any other mesh axis).
      scale: scalar logit scale (already exponentiated and clamped).
      bias: optional scalar logit bias (cancels in the softmax; see module docstring).
      mesh: device mesh; ``None`` computes on a single device with the same math.
      batch_axes: mesh axes the batch dimension is sharded over.
      chunk_size: if set, log-sum-exps are computed over column chunks of this size with an
        online log-sum-exp; it must divide the global batch.

    Returns:
      ``(loss, metrics)`` with float32 scalar metrics ``loss``, ``i2t_top1``, ``t2i_top1``,
      ``logit_scale``, ``pos_sim`` and ``neg_sim``.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected two (B, D) arrays of equal shape, got {image_emb.shape} and {text_emb.shape}"
        )
    batch = image_emb.shape[0]
    if chunk_size is not None and (chunk_size <= 0 or batch % chunk_size != 0):
        raise ValueError(f"chunk_size={chunk_size} must be positive and divide the batch {batch}")

    u = image_emb.astype(jnp.float32)
    v = text_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)

    if mesh is None:
        sums = _local_sums(u, v, u, v, 0, scale, bias, chunk_size)
        return _finalize(sums, batch, scale)

    axes = _resolve_batch_axes(mesh, batch_axes)
    n_shards = 1
    for a in axes:
        n_shards *= mesh.shape[a]
    if batch % n_shards != 0:
        raise ValueError(f"batch {batch} is not divisible by the {n_shards} batch shards {axes}")

    def per_device(u_loc, v_loc, scale, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        # Tiled all_gather concatenates shards in the same row-major order over `axes` that
        # axis_index uses, so this device's rows sit at [offset, offset + local) globally.
        u_all = jax.lax.all_gather(u_loc, axis_name=axes, tiled=True)
        v_all = jax.lax.all_gather(v_loc, axis_name=axes, tiled=True)
        offset = jax.lax.axis_index(axes) * u_loc.shape[0]
        sums = _local_sums(u_loc, v_loc, u_all, v_all, offset, scale, b, chunk_size)
        return {k: jax.lax.psum(sums[k], axes) for k in _SUM_KEYS}

    row_spec = P(axes, None)
    args = (u, v, scale) + (() if bias is None else (bias,))
    in_specs = (row_spec, row_spec, P()) + (() if bias is None else (P(),))
    sums = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=in_specs,
        out_specs={k: P() for k in _SUM_KEYS},
        check_vma=True,
    )(*args)
    return _finalize(sums, batch, scale)


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


def objective(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float | None = None,
    *,
    mesh: Mesh | None,
    kind: str = "contrastive",
    positive_weight: float = 0.0,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective selected by config.

    ``kind="contrastive"``: InfoNCE, plus ``positive_weight * positive_pair_loss`` when the weight
    is positive. ``kind="cosine"`` (LIFT): ``positive_pair_loss`` only; the contrastive metrics
    are still computed (on stop-gradient inputs) so runs of both kinds log comparable numbers,
    and the scale/bias receive zero gradient.

    Returns ``(total, metrics)``. ``metrics["loss"]`` is always the InfoNCE value,
    ``metrics["positive_pair"]`` the mean ``1 - cos`` of the positive pairs, and
    ``metrics["total"]`` the optimised objective (equal to the returned loss).
    """
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; valid kinds are {OBJECTIVE_KINDS}")
    if positive_weight < 0:
        raise ValueError(f"positive_weight must be >= 0, got {positive_weight}")

    contrastive = partial(contrastive_loss, mesh=mesh, batch_axes=batch_axes, chunk_size=chunk_size)
    pos = positive_pair_loss(image_emb, text_emb)

    if kind == "contrastive":
        loss, metrics = contrastive(image_emb, text_emb, scale, bias)
        total = loss + positive_weight * pos if positive_weight > 0 else loss
    else:
        sg = jax.lax.stop_gradient
        sg_bias = None if bias is None else sg(jnp.asarray(bias, jnp.float32))
        _, metrics = contrastive(
            sg(image_emb), sg(text_emb), sg(jnp.asarray(scale, jnp.float32)), sg_bias
        )
        metrics = {k: sg(x) for k, x in metrics.items()}
        total = pos

    metrics = dict(metrics)
    metrics["positive_pair"] = jax.lax.stop_gradient(pos)
    metrics["total"] = jax.lax.stop_gradient(total)
    return total, metrics
