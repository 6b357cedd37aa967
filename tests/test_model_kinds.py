"""The model-kind seam: one batch contract per kind, met by the loader, consumed by the one
train step; a LIFT model answers like a CLIP model."""

import jax
import numpy as np
import pytest
from fake_store import build_fake_store, fake_vector
from tiny import tiny_config

from jaxclip import config as config_lib
from jaxclip import mesh as mesh_lib
from jaxclip import model_kinds, run_setup
from jaxclip.config import ConfigError
from jaxclip.data import pipeline
from jaxclip.train_step import make_train_step

LIFT = {
    "model.kind": "lift",
    "model.image.pool": "mean",
    "model.embed_dim": 24,
    "text_encoder.name": "fake-encoder",
    "text_encoder.dim": 24,
}


def kind_config(kind, tmp_path):
    overrides = LIFT if kind == "lift" else {}
    return tiny_config(**overrides, **{"text_encoder.store_dir": str(tmp_path / "store")})


@pytest.mark.parametrize("kind", sorted(model_kinds.KINDS))
def test_every_kind_meets_its_contract_and_trains_through_the_one_step(kind, tmp_path):
    cfg = kind_config(kind, tmp_path)
    setup = run_setup.build(cfg, jax.devices())
    fields = setup.batch_fields
    assert fields == model_kinds.batch_fields(cfg) and "image" in fields
    if kind == "lift":
        build_fake_store(cfg)
    # The loader yields exactly the contract's fields (plus the record index it logs).
    features = setup.kind.caption_features(cfg, setup.tokenizer, progress=False)
    batches = pipeline.train_loader(cfg.data, features, cfg.data.batch_size)
    local = next(batches)
    batches.close()
    assert set(local) == set(fields) | {"index"}
    for name, field in fields.items():
        assert local[name].shape == (cfg.data.batch_size, *field.shape), name
        assert local[name].dtype == field.dtype, name
    # One step of the same train_step on the loader's batch and on one made from the contract.
    step = make_train_step(setup)
    state = run_setup.init_state(setup)
    before = jax.tree.map(np.asarray, state["params"])
    synthetic = run_setup.synthetic_batch(setup, np.random.default_rng(0))
    for batch in (synthetic, {k: v for k, v in local.items() if k != "index"}):
        state, metrics = step(state, mesh_lib.global_batch(setup.mesh, batch))
        assert np.isfinite(float(metrics["loss"]))
    moved = [np.abs(a - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(state["params"]), strict=True)]  # fmt: skip
    assert max(moved) > 0


def test_lift_batches_carry_the_stored_embedding_of_the_example_caption(tmp_path):
    cfg = kind_config("lift", tmp_path)
    build_fake_store(cfg)
    features = model_kinds.get(cfg).caption_features(cfg, None, progress=False)
    batches = pipeline.train_loader(cfg.data, features, 16)
    batch = next(batches)
    batches.close()
    world = pipeline.training_sources(cfg.data)[0][0].world
    for index, row in zip(batch["index"], batch["text_emb"], strict=True):
        want = fake_vector(world.caption(int(index)), 24).astype(np.float16)
        np.testing.assert_array_equal(row, want)


def test_unknown_kind_and_a_head_of_the_wrong_width_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.kind='siglip2'; use one of \['clip', 'lift'\]"):
        run_setup.build(tiny_config(**{"model.kind": "siglip2"}))
    wrong = tiny_config(**{**LIFT, "model.embed_dim": 32})
    with pytest.raises(ConfigError, match="model.embed_dim=32 must equal text_encoder.dim=24"):
        run_setup.build(wrong)


@pytest.mark.parametrize(
    "kind, impl", [("clip", "gather"), ("clip", "ring"), ("lift", "gather"), ("lift", "ring")]
)
def test_a_step_accumulated_over_4_micro_batches_equals_the_full_batch_step(kind, impl, tmp_path):
    """train.accum_steps through the one train step: same loss, same parameters after the
    update (eps 1e-4: the attention key bias has an exactly-zero gradient whose rounding
    noise Adam would otherwise amplify to +-lr)."""
    overrides = {"loss.impl": impl, "optim.eps": 1e-4, "data.batch_size": 32}
    after = {}
    for steps in (1, 4):
        cfg = kind_config(kind, tmp_path)
        values = {**overrides, "train.accum_steps": steps}
        config_lib.apply_overrides(cfg, [(k, str(v)) for k, v in values.items()])
        setup = run_setup.build(cfg, jax.devices())
        batch = run_setup.synthetic_batch(setup, np.random.default_rng(1))
        state, metrics = make_train_step(setup)(
            run_setup.init_state(setup), mesh_lib.global_batch(setup.mesh, batch)
        )
        after[steps] = jax.tree.map(np.asarray, (state["params"], metrics))
    (params_1, metrics_1), (params_4, metrics_4) = after[1], after[4]
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_4), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
