"""Training: same result on any mesh, exact resume, resharded restore, clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.checkpoint import Checkpointer, CheckpointError, abstract_like


def saved_params(cfg, workdir, step=None, devices=None):
    """Parameters of a saved step, restored onto `devices` (default: one device)."""
    devices = devices or jax.devices()[:1]
    if np.prod([cfg.mesh.shape[a] for a in ("data", "fsdp", "tensor")]) != len(devices):
        cfg = tiny_config(**{"mesh.shape.data": -1, "mesh.shape.fsdp": 1, "mesh.shape.tensor": 1})
    setup = run_setup.build(cfg, devices)
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step() if step is None else step
    state = ckpt.restore(step, abstract_like(setup.abstract_state, setup.state_shardings))
    ckpt.close()
    return jax.tree.map(np.asarray, state["params"]), state


def index_sums(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/data/index_sum"] for r in rows if "train/data/index_sum" in r}


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_two_steps_on_different_meshes_give_the_same_parameters(tmp_path):
    meshes = {"8x1x1": (8, 1, 1), "4x2x1": (4, 2, 1), "2x2x2": (2, 2, 2), "1x1x1": (1, 1, 1)}
    params = {}
    for name, (d, f, t) in meshes.items():
        # The key bias gets an exactly-zero gradient (softmax is shift-invariant); with
        # eps=1e-6 Adam turns its ~1e-9 float noise into +-lr steps. A larger eps keeps the
        # comparison about sharding, not about amplified rounding.
        cfg = tiny_config(
            **{
                "train.steps": 2,
                "mesh.shape.data": d,
                "mesh.shape.fsdp": f,
                "mesh.shape.tensor": t,
                "optim.eps": 1e-4,
            }
        )
        devices = jax.devices()[: d * f * t]
        train_lib.train(cfg, tmp_path / name, devices=devices, progress=False)
        params[name], _ = saved_params(cfg, tmp_path / name)
    reference = params.pop("1x1x1")
    for p in params.values():
        assert_trees_close(p, reference)
    # The steps really changed the parameters (the comparison is not of two initial states).
    cfg = tiny_config()
    setup = run_setup.build(cfg, jax.devices()[:1])
    initial = jax.tree.map(np.asarray, run_setup.init_state(setup)["params"])
    pairs = zip(jax.tree.leaves(reference), jax.tree.leaves(initial), strict=True)
    moved = [np.abs(a - b).max() for a, b in pairs]
    assert max(moved) > 1e-4


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(**{"train.steps": 6, "train.checkpoint_every": 100})
    train_lib.train(cfg, tmp_path / "straight", progress=False)
    train_lib.train(cfg, tmp_path / "resumed", stop_at_step=3, progress=False)
    assert Checkpointer(tmp_path / "resumed").latest_step() == 3
    train_lib.train(cfg, tmp_path / "resumed", progress=False)

    straight, s_state = saved_params(cfg, tmp_path / "straight")
    resumed, r_state = saved_params(cfg, tmp_path / "resumed")
    assert int(s_state["step"]) == int(r_state["step"]) == 6
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(x, y)
    # Same data, in the same order, on both sides of the interruption.
    assert index_sums(tmp_path / "straight") == index_sums(tmp_path / "resumed")
    assert len(set(index_sums(tmp_path / "straight").values())) == 6


def test_checkpoint_saved_on_8_devices_restores_on_4_and_on_1(tmp_path):
    cfg = tiny_config(**{"train.steps": 2, "mesh.shape.data": 1, "mesh.shape.fsdp": 8})
    train_lib.train(cfg, tmp_path, progress=False)
    on_8, state_8 = saved_params(cfg, tmp_path, devices=jax.devices())
    sharded = [
        x
        for x in jax.tree.leaves(state_8["params"])
        if len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    ]
    assert sharded, "the 8-device restore should shard parameters over fsdp"
    for n in (4, 1):
        cfg_n = tiny_config(**{"mesh.shape.data": 1, "mesh.shape.fsdp": n})
        params_n, state_n = saved_params(cfg_n, tmp_path, devices=jax.devices()[:n])
        assert {len(x.sharding.device_set) for x in jax.tree.leaves(state_n["params"])} == {n}
        for x, y in zip(jax.tree.leaves(on_8), jax.tree.leaves(params_n), strict=True):
            np.testing.assert_array_equal(x, y)
    # Training continues from the 8-device checkpoint on 4 devices.
    cfg_4 = tiny_config(**{"train.steps": 3, "mesh.shape.data": 4})
    train_lib.train(cfg_4, tmp_path, devices=jax.devices()[:4], progress=False)
    assert Checkpointer(tmp_path).latest_step() == 3


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    cfg = tiny_config(**{"train.steps": 2})
    train_lib.train(cfg, tmp_path, progress=False)
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and "manifest" in path.name or path.parent.name == "d":
            path.write_bytes(b"garbage")
    shutil.rmtree(state_dir / "ocdbt.process_0", ignore_errors=True)
    with pytest.raises(CheckpointError, match=r"rm -rf .*checkpoints/2"):
        train_lib.train(tiny_config(**{"train.steps": 4}), tmp_path, progress=False)


def test_checkpoint_of_a_different_model_is_refused(tmp_path):
    train_lib.train(tiny_config(**{"train.steps": 2}), tmp_path, progress=False)
    other = tiny_config(**{"train.steps": 4, "model.embed_dim": 64})
    with pytest.raises(CheckpointError, match=r"model\.embed_dim: saved 32 vs 64"):
        train_lib.train(other, tmp_path, progress=False)


def test_unwritable_workdir_gives_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # Root ignores permission bits: act as an unprivileged user for the check.
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        with pytest.raises(train_lib.WorkdirError, match="Cannot write to the workdir") as err:
            train_lib.prepare_workdir(locked / "run")
    finally:
        if as_root:
            os.seteuid(0)
    assert "--workdir" in str(err.value)
