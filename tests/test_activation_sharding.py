"""Activation sharding: under fsdp the batch is split and the weights are gathered (ZeRO-3),
not the other way round; any mesh gives the single-device step's numbers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from jaxclip import aot, run_setup
from jaxclip import config as config_lib
from jaxclip import mesh as mesh_lib
from jaxclip.train_step import make_train_step

RULES = dict(config_lib.base_config().mesh.rules)
COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
ARRAY = re.compile(r"(pred|s8|u8|s32|u32|bf16|f16|f32)\[([\d,]*)\]")


def mesh(d: int, f: int, t: int):
    return mesh_lib.make_mesh(dict(data=d, fsdp=f, tensor=t), jax.devices()[: d * f * t])


def compiled_step(d: int, f: int, t: int, **overrides):
    cfg = tiny_config(
        **{"mesh.shape.data": d, "mesh.shape.fsdp": f, "mesh.shape.tensor": t, **overrides}
    )
    return aot.compile_train_step(cfg, jax.devices()[: d * f * t])


def collective_arrays(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every array a collective produces in compiled HLO text."""
    arrays = []
    for result, _ in COLLECTIVE.findall(hlo):
        arrays += [
            (dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in ARRAY.findall(result)
        ]
    assert arrays, "no collective found: the check would pass vacuously"
    return arrays


def test_constrain_is_a_no_op_outside_activation_sharding():
    x = jnp.ones((8, 4, 16))
    assert mesh_lib.constrain(x, ("batch", "length", "act_embed")) is x


def test_activation_names_map_the_batch_over_data_and_fsdp():
    names = ("batch", "length", "act_heads", "act_kv")
    assert mesh_lib.logical_to_spec(names, (16, 5, 4, 8), RULES, mesh(2, 2, 2)) == P(
        ("data", "fsdp"), None, "tensor", None
    )
    assert mesh_lib.logical_to_spec(names, (16, 5, 4, 8), RULES, mesh(1, 8, 1)) == P(
        "fsdp", None, None, None
    )
    # A batch the batch shards do not divide is replicated, not split unevenly.
    assert mesh_lib.logical_to_spec(names, (12, 5, 4, 8), RULES, mesh(1, 8, 1)) == P(
        None, None, None, None
    )


def test_fsdp_step_has_no_collective_spanning_the_global_batch_of_activations():
    batch, embed = 48, 24  # sizes no other dimension has
    hlo = compiled_step(1, 8, 1, **{"data.batch_size": batch, "model.embed_dim": embed}).as_text()
    spanning = [
        (dtype, shape)
        for dtype, shape in collective_arrays(hlo)
        if batch in shape and dtype in ("bf16", "f16", "f32")
    ]
    # The one exception is the loss's all-gather of the (global batch, embed) embeddings.
    assert spanning and set(spanning) == {("f32", (batch, embed))}, spanning


def test_fsdp_temporaries_are_below_data_parallel_for_a_parameter_dominated_model():
    # 16 px images (5 tokens), one example per device: the parameters dominate memory.
    big = {
        "data.batch_size": 8,
        "data.image_size": 16,
        "model.image.variant": "demo/8",
        "model.text.width": 128,
        "model.text.heads": 4,
        "model.embed_dim": 64,
    }
    data_parallel = aot.MemoryUse.of(compiled_step(8, 1, 1, **big))
    fsdp = aot.MemoryUse.of(compiled_step(1, 8, 1, **big))
    assert fsdp.arguments < data_parallel.arguments / 4  # the state is sharded 8 ways
    assert fsdp.temporaries < data_parallel.temporaries


# Heads 4 so that tensor=4 splits them; eps 1e-4: the key bias gets an exactly-zero gradient
# whose float noise Adam's eps=1e-6 would amplify to +-lr steps (as in test_train.py).
STEP_CONFIG = {
    "model.image.variant": "demo/8",
    "data.image_size": 16,
    "model.text.heads": 4,
    "optim.eps": 1e-4,
    "train.steps": 2,
}


def two_steps(d: int, f: int, t: int):
    cfg = tiny_config(
        **{"mesh.shape.data": d, "mesh.shape.fsdp": f, "mesh.shape.tensor": t, **STEP_CONFIG}
    )
    setup = run_setup.build(cfg, jax.devices()[: d * f * t])
    step = make_train_step(setup)
    state = run_setup.init_state(setup)
    rng = np.random.default_rng(0)
    b, s, length = cfg.data.batch_size, cfg.data.image_size, cfg.data.context_length
    losses = []
    for _ in range(2):
        lengths = rng.integers(2, length + 1, b)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        batch = {
            "image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
            "tokens": rng.integers(1, 8, (b, length)).astype(np.int32) * mask,
            "mask": mask,
        }
        state, metrics = step(state, mesh_lib.global_batch(setup.mesh, batch))
        losses.append(float(metrics["loss"]))
    return jax.tree.map(np.asarray, state["params"]), losses


@pytest.fixture(scope="module")
def single_device():
    return two_steps(1, 1, 1)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)], ids=str)
def test_two_steps_equal_the_single_device_steps(shape, single_device):
    ref_params, ref_losses = single_device
    params, losses = two_steps(*shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
