"""The precision policy, audited on the lowered train step (StableHLO text) in bfloat16:
bf16 matmul inputs, a float32 residual stream across the layers, float32 normalization and
softmax statistics, float32 parameters and optimizer state."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip.train_step import make_train_step

BATCH, EMBED, IMAGE_WIDTH, TEXT_WIDTH = 16, 24, 32, 40  # distinct sizes, to tell ops apart
TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")


def shapes(signature: str) -> list[tuple[tuple[int, ...], str]]:
    """[(shape, dtype)] of every tensor type in a piece of StableHLO text."""
    return [
        (tuple(int(d) for d in dims.split("x") if d), dtype)
        for dims, dtype in TENSOR.findall(signature)
    ]


@pytest.fixture(scope="module")
def lowered():
    cfg = tiny_config(
        **{
            "model.dtype": "bfloat16",
            "model.remat": "true",
            "model.scan_layers": "true",
            # XLA's attention keeps bf16 operands in its backward (BF16_BF16_F32 dots); the
            # einsum reference's backward upcasts the score gradients, as JAX transposes a
            # float32-output dot. Accelerators use cudnn/pallas/xla, never the reference.
            "model.attention": "xla",
            "model.embed_dim": EMBED,
            "model.text.width": TEXT_WIDTH,
            "data.batch_size": BATCH,
        }
    )
    setup = run_setup.build(cfg, jax.devices()[:1])
    return make_train_step(setup).lower(*setup.abstract_inputs())


def dot_operands(text: str) -> list[list[tuple[tuple[int, ...], str]]]:
    ops = re.findall(r"stablehlo\.dot_general [^\n]*?: \(([^)]*)\)", text)
    assert ops, "no matmul found: the audit would pass vacuously"
    return [shapes(signature) for signature in ops]


def test_every_matmul_on_token_activations_takes_bfloat16(lowered):
    """Projections, MLPs and their gradients: any matmul with a (batch, length, features)
    operand has only bfloat16 operands, or, in attention's backward, a float32 score
    cotangent against bfloat16 keys/values/queries."""
    for operands in dot_operands(lowered.as_text()):
        if any(len(shape) == 3 for shape, _ in operands):
            assert all(dtype == "bf16" for _, dtype in operands), operands
        if all(dtype == "f32" for _, dtype in operands):
            # Only the loss multiplies in float32: unit-norm embeddings (batch, embed).
            dims = {d for shape, _ in operands for d in shape}
            assert dims <= {BATCH, EMBED, 1}, operands


def test_the_residual_stream_is_float32_across_the_layers(lowered):
    """The scanned layers carry (batch, length, width) activations: all float32."""
    carries = []
    for signature in re.findall(r"stablehlo\.while\([^\n]*?\) : ([^\n]*)", lowered.as_text()):
        carries += [
            (shape, dtype)
            for shape, dtype in shapes(signature.split(" do")[0])
            if len(shape) == 3 and shape[0] == BATCH and shape[2] in (IMAGE_WIDTH, TEXT_WIDTH)
        ]
    assert {shape[2] for shape, _ in carries} == {IMAGE_WIDTH, TEXT_WIDTH}
    assert all(dtype == "f32" for _, dtype in carries), carries


def test_normalization_and_softmax_statistics_are_float32(lowered):
    """Every floating reduction over the last axis (LayerNorm mean and variance, softmax max
    and sum) reduces float32 values."""
    found = 0
    for dims, operand in re.findall(
        r"stablehlo\.reduce\([^\n]*?dimensions = \[([\d, ]*)\] : \(([^,]*)", lowered.as_text()
    ):
        (shape, dtype), *_ = shapes(operand)
        axes = [int(d) for d in dims.split(",") if d.strip()]
        if axes == [len(shape) - 1] and len(shape) >= 2 and dtype in ("bf16", "f16", "f32"):
            assert dtype == "f32", (shape, dtype)
            found += 1
    assert found >= 4


def test_parameters_and_optimizer_state_are_float32_in_and_out(lowered):
    state_in, _ = lowered.args_info[0]
    state_out = lowered.out_info[0]
    for tree in (state_in["params"], state_in["opt_state"], state_out["params"]):
        dtypes = {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)}
        assert dtypes <= {np.dtype(np.float32), np.dtype(np.int32)}, dtypes
    assert np.dtype(jax.tree.leaves(state_in["params"])[0].dtype) == np.float32
