"""The train step's own rules: the logit scale's bound, non-finite steps."""

import math

import jax
import numpy as np
from tiny import tiny_config

from jaxclip import mesh as mesh_lib
from jaxclip import run_setup
from jaxclip.train_step import make_train_step


def test_the_logit_scale_comes_back_below_the_bound_when_the_loss_pushes_it_down():
    # Unrelated random captions: the loss falls as the temperature rises, so the scale must
    # fall. It starts above the bound (log 120 > log 100): the first update clamps it, and
    # the gradient then keeps pushing it down, which a clamp in the forward pass would block.
    cfg = tiny_config(
        **{"model.init_logit_scale": math.log(120.0), "optim.lr": 5e-2, "optim.warmup_steps": 0}
    )
    setup = run_setup.build(cfg, jax.devices()[:1])
    step = make_train_step(setup)
    state = run_setup.init_state(setup)
    scales = []
    for seed in range(8):
        local = run_setup.synthetic_batch(setup, np.random.default_rng(seed))
        state, metrics = step(state, mesh_lib.global_batch(setup.mesh, local))
        scales.append(float(np.exp(state["params"]["logit_scale"])))
    assert scales[0] <= 100.0 + 1e-3  # clamped by the first update
    assert scales[-1] < 95.0 and scales == sorted(scales, reverse=True), scales
    np.testing.assert_allclose(metrics["logit_scale"], scales[-2], rtol=1e-5)  # used = logged


def test_a_non_finite_step_stops_the_run_naming_the_step_and_the_last_checkpoint(tmp_path):
    import pytest

    from jaxclip import train as train_lib
    from jaxclip.checkpoint import Checkpointer

    train_lib.train(tiny_config(**{"train.steps": 2}), tmp_path, progress=False)
    # An absurd learning rate: step 3's update is finite but huge, step 4 overflows.
    blowup = {"train.steps": 8, "optim.lr": 1e30, "optim.warmup_steps": 0}
    with pytest.raises(train_lib.NonFiniteError) as err:
        train_lib.train(tiny_config(**blowup), tmp_path, progress=False)
    message = str(err.value)
    assert "Step 4 gave a non-finite loss or gradient" in message
    assert f"step 2 in {tmp_path / 'checkpoints'}" in message and "skip_nonfinite" in message
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.all_steps() == [2]  # nothing non-finite was saved
    checkpointer.close()


def test_skip_nonfinite_keeps_the_last_finite_state_and_counts_the_skips(tmp_path):
    from training_processes import metrics, saved_params

    overrides = {"optim.lr": 1e30, "optim.warmup_steps": 0, "train.skip_nonfinite": True}
    # Step 1's update is finite but huge; every later step overflows and is skipped.
    cfg = tiny_config(**overrides, **{"train.steps": 1})
    train_lib_train(cfg, tmp_path / "one")
    longer = tiny_config(**overrides, **{"train.steps": 6})
    train_lib_train(longer, tmp_path / "six")
    rows = [r for r in metrics(tmp_path / "six") if "train/loss" in r]
    assert [r["train/nonfinite"] for r in rows] == [0, 1, 1, 1, 1, 1]
    assert rows[-1]["train/skipped_steps"] == 5
    # The state after the skipped steps is the state after step 1.
    for a, b in zip(
        jax.tree.leaves(saved_params(cfg, tmp_path / "one")),
        jax.tree.leaves(saved_params(longer, tmp_path / "six")),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def train_lib_train(cfg, workdir):
    from jaxclip import train as train_lib

    train_lib.train(cfg, workdir, progress=False)


def test_a_parameter_the_mesh_cannot_shard_is_named():
    from flax import nnx

    from jaxclip.run_setup import replicated_dims

    # Two heads on tensor=4: the heads dimension cannot be split four ways.
    cfg = tiny_config(**{"mesh.shape.data": 2, "mesh.shape.tensor": 4})
    setup = run_setup.build(cfg, jax.devices())
    _, state = nnx.split(nnx.eval_shape(setup.model_fn))
    found = replicated_dims(state, dict(cfg.mesh.rules), setup.mesh)
    assert any(
        m.startswith("Parameter image/blocks/q_kernel: its 'heads' dimension (2)") for m in found
    )
    assert all("not divisible by mesh axis 'tensor' (4)" in m for m in found)
    assert not replicated_dims(state, dict(cfg.mesh.rules), run_setup.build(tiny_config()).mesh)


def test_a_locked_tower_stays_bit_identical_and_its_backward_is_never_computed():
    overrides = {"optim.frozen": "('image/.*',)", "model.scan_layers": False}
    cfg = tiny_config(**overrides)
    setup = run_setup.build(cfg, jax.devices()[:1])
    step = make_train_step(setup)
    state = run_setup.init_state(setup)
    before = jax.tree.map(np.asarray, state["params"])
    for seed in range(3):
        local = run_setup.synthetic_batch(setup, np.random.default_rng(seed))
        state, _ = step(state, mesh_lib.global_batch(setup.mesh, local))
    after = jax.tree.map(np.asarray, state["params"])
    for a, b in zip(jax.tree.leaves(before["image"]), jax.tree.leaves(after["image"]), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = [np.abs(a - b).max() for a, b in zip(
        jax.tree.leaves(before["text"]), jax.tree.leaves(after["text"]), strict=True)]  # fmt: skip
    assert max(moved) > 0

    # The image tower's backward pass is gone from the compiled step, not computed and dropped.
    def step_flops(config):
        s = run_setup.build(config, jax.devices()[:1])
        compiled = make_train_step(s).lower(*s.abstract_inputs()).compile()
        return compiled.cost_analysis()["flops"]

    locked, free = step_flops(cfg), step_flops(tiny_config(**{"model.scan_layers": False}))
    assert locked < 0.8 * free, (locked, free)
