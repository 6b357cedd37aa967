"""The gradient cache: k micro-batches give the update of one full-batch step (real models)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from jaxclip import losses
from jaxclip.data.transforms import normalize_images
from jaxclip.grad_cache import accumulated_value_and_grad, micro_batches
from jaxclip.models.build import build_clip_model, build_lift_model

BATCH, STEPS, VOCAB, LR = 32, 4, 64, 1e-3
# These programs run a few times each: compiling them without LLVM's optimisations is 2-3x
# faster, and both sides of every comparison are compiled the same way.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
LIFT = {
    "model.kind": "lift",
    "model.image.pool": "mean",
    "model.embed_dim": 48,
    "text_encoder.dim": 48,
}


def _mesh(shape=(4, 2, 1)):
    return jax.make_mesh(
        shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def _model(**overrides):
    """A tiny real CLIP (or LIFT) model: its config, graph and parameters."""
    cfg = tiny_config(**{"model.logit_bias": "-2.0", **overrides})

    def build():
        if cfg.model.kind == "lift":
            return build_lift_model(cfg.model, image_size=32, rngs=nnx.Rngs(0))
        return build_clip_model(cfg.model, image_size=32, vocab_size=VOCAB, rngs=nnx.Rngs(0))

    graphdef = nnx.graphdef(nnx.eval_shape(build))
    # Initialised under jit: eager initialisation dispatches every op and takes seconds.
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())))()
    return cfg, graphdef, params


def _batch(mesh, cfg, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)}
    if cfg.model.kind == "lift":
        batch["text_emb"] = rng.normal(size=(BATCH, cfg.text_encoder.dim)).astype(np.float16)
    else:
        lengths = rng.integers(2, 16, BATCH)
        mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int32)
        batch["tokens"] = rng.integers(1, VOCAB, (BATCH, 16)).astype(np.int32) * mask
        batch["mask"] = mask
    if mesh is None:
        return {k: jnp.asarray(x) for k, x in batch.items()}
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    return {k: jax.device_put(x, rows) for k, x in batch.items()}


def _embed_fn(graphdef, lift):
    """The train step's forward: both towers (CLIP) or the image side + stored texts (LIFT)."""

    def embed(params, batch):
        model = nnx.merge(graphdef, params)
        images = normalize_images(batch["image"])
        if lift:  # the text side is a batch field: no parameter reaches it
            return model(images, batch["text_emb"])
        return model(images, batch["tokens"], batch["mask"])

    return embed


# Every kind and impl; one compiled step takes the objective as an index (`lax.switch`), so
# the model is compiled once per number of micro-batches, not once per objective.
OBJECTIVES = [
    dict(kind="contrastive", impl="gather", positive_weight=0.3),
    dict(kind="contrastive", impl="ring", chunk_size=3),
    dict(kind="siglip", impl="gather", chunk_size=3),
    dict(kind="siglip", impl="ring", positive_weight=0.3),
    dict(kind="cosine", impl="gather"),
    dict(kind="cosine", impl="ring"),
]


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=QUICK_COMPILE)


def _make_step(cfg, graphdef, params, batch, mesh, steps, objectives):
    """One AdamW step: (params, batch, objective index) -> (loss, metrics, grads, new params)."""
    tx = optax.adamw(LR, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2)
    embed = _embed_fn(graphdef, cfg.model.kind == "lift")

    def objective(options, out):
        return losses.objective(
            out["image"], out["text"], out["scale"], out["bias"], mesh=mesh, **options
        )

    def step(params, batch, which):
        branches = [lambda out, o=options: objective(o, out) for options in objectives]
        loss_fn = lambda out: jax.lax.switch(which, branches, out)
        (loss, metrics), grads = accumulated_value_and_grad(
            embed, loss_fn, params, batch, steps=steps, mesh=mesh
        )
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, metrics, grads, optax.apply_updates(params, updates)

    return _compile(step, params, batch, jnp.int32(0))


def _assert_trees_close(got, want, rtol, atol):
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _assert_accumulation_matches(cfg, graphdef, params, batch, mesh, objectives):
    full = _make_step(cfg, graphdef, params, batch, mesh, 1, objectives)
    accumulated = _make_step(cfg, graphdef, params, batch, mesh, STEPS, objectives)
    for which, options in enumerate(objectives):
        want = full(params, batch, jnp.int32(which))
        got = accumulated(params, batch, jnp.int32(which))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=str(options))
        for key in want[1]:
            np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, atol=1e-7, err_msg=key)
        # Float32 sums in another order: to 1e-6 of the largest gradient.
        noise = 1e-6 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want[2]))
        _assert_trees_close(got[2], want[2], rtol=1e-4, atol=noise)
        # Parameters after AdamW, where the gradient is more than rounding noise. Entries whose
        # gradient is zero in exact arithmetic (attention key biases: softmax ignores a shift)
        # get a step of about +-LR from Adam's normalisation, whichever way the noise falls.
        signal = jax.tree.map(lambda g, n=noise: np.abs(np.asarray(g)) > n, want[2])
        _assert_trees_close(
            jax.tree.map(lambda x, m: np.asarray(x)[m], got[3], signal),
            jax.tree.map(lambda x, m: np.asarray(x)[m], want[3], signal),
            rtol=0,
            atol=1e-2 * LR,
        )
        moved = jax.tree.map(lambda new, old: float(jnp.max(jnp.abs(new - old))), want[3], params)
        assert max(jax.tree.leaves(moved)) > 0.5 * LR, options


def test_four_micro_batches_update_clip_like_one_full_batch():
    mesh = _mesh()
    cfg, graphdef, params = _model()
    _assert_accumulation_matches(cfg, graphdef, params, _batch(mesh, cfg), mesh, OBJECTIVES)


def test_four_micro_batches_update_lift_like_one_full_batch():
    mesh = _mesh((2, 2, 2))
    cfg, graphdef, params = _model(**LIFT)
    objectives = [OBJECTIVES[1], OBJECTIVES[3]]
    _assert_accumulation_matches(cfg, graphdef, params, _batch(mesh, cfg, 1), mesh, objectives)


def test_averaging_micro_batch_losses_is_not_the_full_batch_gradient():
    # What the gradient cache avoids: each micro-batch seeing only its own negatives.
    cfg, graphdef, params = _model()
    batch = _batch(None, cfg)
    embed = _embed_fn(graphdef, lift=False)

    def loss(params, batch):
        out = embed(params, batch)
        return losses.objective(out["image"], out["text"], out["scale"], mesh=None)[0]

    def full_and_averaged(params, batch):
        averaged = jax.lax.map(
            lambda micro: jax.grad(loss)(params, micro), micro_batches(batch, STEPS, None)
        )
        return jax.grad(loss)(params, batch), jax.tree.map(lambda g: g.mean(0), averaged)

    full, averaged = _compile(full_and_averaged, params, batch)(params, batch)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), full, averaged)
    assert max(jax.tree.leaves(diffs)) > 1e-3


def test_micro_batches_take_every_devices_share_and_move_no_data():
    mesh = _mesh((2, 2, 2))
    rows = jnp.arange(BATCH * 3).reshape(BATCH, 3)
    x = jax.device_put(rows, NamedSharding(mesh, P(("data", "fsdp"))))
    split = jax.jit(lambda x: micro_batches(x, STEPS, mesh))
    cut = split(x)
    # 4 batch shards of 8 rows: micro-batch m holds rows 2m, 2m+1 of each shard's block.
    shard, per = BATCH // 4, BATCH // 4 // STEPS
    for m in range(STEPS):
        want = [s * shard + m * per + j for s in range(4) for j in range(per)]
        np.testing.assert_array_equal(cut[m], np.asarray(rows)[want])
    assert cut.sharding.spec == P(None, ("data", "fsdp"))
    hlo = split.lower(x).compile().as_text()
    for collective in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
        assert collective not in hlo


def test_steps_that_do_not_divide_a_devices_share_raise():
    mesh = _mesh()  # 8 batch shards of 4 rows: 3 micro-batches do not divide them
    batch = jax.device_put(jnp.ones((BATCH, 2)), NamedSharding(mesh, P(("data", "fsdp"))))
    embed = lambda params, micro: {"image": micro * params, "text": micro}
    with pytest.raises(ValueError, match="accum_steps"):
        accumulated_value_and_grad(
            embed, lambda out: (0.0, {}), jnp.float32(1), batch, steps=3, mesh=mesh
        )
