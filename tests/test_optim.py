"""What weight decay applies to, listed for every model kind."""

import jax
import pytest
from flax import nnx
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip.optim import decay_mask

KERNELS = ["fc1_kernel", "fc2_kernel", "k_kernel", "out_kernel", "q_kernel", "v_kernel"]
EXPECTED = {
    "clip": [f"image/blocks/{k}" for k in KERNELS]
    + ["image/patch_kernel", "image/proj"]
    + [f"text/blocks/{k}" for k in KERNELS]
    + ["text/proj", "text/token_embed"],
    "lift": ["head/fc1", "head/fc2"]
    + [f"image/blocks/{k}" for k in KERNELS]
    + ["image/patch_kernel"],
}
LIFT = {"model.kind": "lift", "model.image.pool": "mean", "model.embed_dim": 48}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_weight_decay_applies_to_matrices_and_the_token_embedding_only(kind):
    cfg = tiny_config(**(LIFT | {"text_encoder.dim": 48} if kind == "lift" else {}))
    setup = run_setup.build(cfg, jax.devices()[:1])
    _, state = nnx.split(nnx.eval_shape(setup.model_fn))
    flat = jax.tree_util.tree_leaves_with_path(decay_mask(state))
    decayed = sorted("/".join(str(k.key) for k in path) for path, on in flat if on)
    assert decayed == sorted(EXPECTED[kind])
    # Not decayed: every bias (q/k/v biases have two axes), gain, position embedding,
    # class token and the logit scale.
    kept = {"/".join(str(k.key) for k in path) for path, on in flat if not on}
    assert {"image/blocks/q_bias", "image/pos_embed", "logit_scale"} <= kept
