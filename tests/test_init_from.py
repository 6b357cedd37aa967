"""init.from and optim.frozen: a new run starts from saved weights; a locked tower stays put."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import tiny_config

from jaxclip import config as config_lib
from jaxclip.models.build import build_clip_model
from jaxclip.optim import decay_mask, frozen_labels, make_optimizer
from jaxclip.run_setup import build
from jaxclip.weights import convert
from jaxclip.weights.architectures import WeightsError
from jaxclip.weights.init_from import initial_params

HF_DIR = Path(__file__).parent / "fixtures" / "clip_hf_tiny"


def _imported_tiny_config(**overrides):
    """tiny_config with the HF fixture's architecture (mu/8 towers, 16-d embeddings)."""
    values = {
        "model.embed_dim": "16",
        "model.text.depth": "2",
        "model.text.vocab_size": "512",
        "model.act": "quick_gelu",
        **overrides,
    }
    return tiny_config(**values)


def test_initial_params_equal_the_imported_weights(tmp_path):
    convert.import_weights("hf", HF_DIR, tmp_path / "w")
    cfg = _imported_tiny_config(**{"init.from": str(tmp_path / "w")})
    setup = build(cfg)
    params = initial_params(cfg, setup.abstract_state["params"], setup.state_shardings["params"])
    expected = convert.read_foreign("hf", HF_DIR).params
    assert convert.params_equal(jax.device_get(params), expected)
    leaf = params["image"]["blocks"]["q_kernel"]
    assert leaf.sharding == setup.state_shardings["params"]["image"]["blocks"]["q_kernel"]


def test_initial_params_from_a_foreign_directory_directly():
    cfg = _imported_tiny_config(**{"init.from": str(HF_DIR)})
    setup = build(cfg)
    params = initial_params(cfg, setup.abstract_state["params"], setup.state_shardings["params"])
    assert convert.params_equal(jax.device_get(params), convert.read_foreign("hf", HF_DIR).params)


def test_initial_params_resize_position_embeddings_for_another_image_size(tmp_path):
    convert.import_weights("hf", HF_DIR, tmp_path / "w")
    cfg = _imported_tiny_config(**{"init.from": str(tmp_path / "w"), "data.image_size": "48"})
    setup = build(cfg)
    params = initial_params(cfg, setup.abstract_state["params"], setup.state_shardings["params"])
    assert params["image"]["pos_embed"].shape == (1 + 6 * 6, 32)


def test_initial_params_refuse_another_architecture(tmp_path):
    convert.import_weights("hf", HF_DIR, tmp_path / "w")
    cfg = _imported_tiny_config(**{"init.from": str(tmp_path / "w"), "model.embed_dim": "32"})
    setup = build(cfg)
    with pytest.raises(WeightsError, match="shape mismatch for jaxclip parameter image/proj"):
        initial_params(cfg, setup.abstract_state["params"], setup.state_shardings["params"])


def test_initial_params_refuse_a_missing_source(tmp_path):
    cfg = _imported_tiny_config(**{"init.from": str(tmp_path / "nothing")})
    setup = build(cfg)
    with pytest.raises(WeightsError, match="neither a jaxclip workdir"):
        initial_params(cfg, setup.abstract_state["params"], setup.state_shardings["params"])


def test_a_run_starts_from_init_from_and_then_resumes_its_own_checkpoints(tmp_path):
    from training_processes import saved_params

    from jaxclip import train as train_lib
    from jaxclip.checkpoint import CheckpointError

    convert.import_weights("hf", HF_DIR, tmp_path / "w")
    overrides = {"init.from": str(tmp_path / "w"), "train.steps": 2, "optim.lr": 0.0}
    cfg = _imported_tiny_config(**overrides, **{"optim.warmup_steps": 0})
    train_lib.train(cfg, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    # lr 0: two steps later the parameters are still exactly the imported ones.
    expected = convert.read_foreign("hf", HF_DIR).params
    assert convert.params_equal(saved_params(cfg, tmp_path / "run", num_devices=1), expected)
    # The run's own checkpoint takes precedence over init.from: it continues at step 3.
    more = _imported_tiny_config(**{**overrides, "train.steps": 4, "optim.lr": 1e-2})
    train_lib.train(more, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    # An import's workdir is weights to start from, not a run to resume.
    plain = _imported_tiny_config(**{"train.steps": 2})
    with pytest.raises(CheckpointError, match=r"imported weights.*--config.init.from="):
        train_lib.train(plain, tmp_path / "w", progress=False)


# ---------------------------------------------------------------------------------------------
# optim.frozen
# ---------------------------------------------------------------------------------------------


def _tiny_clip(cfg):
    model = build_clip_model(
        cfg.model, image_size=cfg.data.image_size, vocab_size=64, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, decay_mask(state))
    return graphdef, nnx.to_pure_dict(state), tx


def _batch(cfg, seed):
    rng = np.random.default_rng(seed)
    b, s, ctx = 8, cfg.data.image_size, cfg.data.context_length
    mask = (np.arange(ctx)[None] < rng.integers(3, ctx, (b, 1))).astype(np.int32)
    tokens = rng.integers(4, 64, (b, ctx)).astype(np.int32) * mask
    images = rng.standard_normal((b, s, s, 3)).astype(np.float32)
    return images, tokens, mask


def _train(cfg, steps=3):
    """`steps` AdamW steps of CLIP's symmetric InfoNCE on random batches (one device)."""
    graphdef, params, tx = _tiny_clip(cfg)

    def loss_fn(params, images, tokens, mask):
        out = nnx.merge(graphdef, params)(images, tokens, mask)
        logits = out["scale"] * out["image"] @ out["text"].T
        labels = jnp.arange(logits.shape[0])
        return (
            optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
        )

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    before, opt_state = params, tx.init(params)
    for i in range(steps):
        params, opt_state = step(params, opt_state, _batch(cfg, i))
    return jax.device_get(before), jax.device_get(params), opt_state


def _changed(a, b) -> bool:
    return any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_locked_image_tower_is_bit_identical_while_the_text_tower_trains():
    cfg = tiny_config(**{"optim.frozen": "('image/.*',)", "optim.lr": "1e-2"})
    before, after, _ = _train(cfg)
    assert not _changed(before["image"], after["image"])
    assert _changed(before["text"], after["text"])


def test_locked_text_tower_is_bit_identical_while_the_image_tower_trains():
    cfg = tiny_config(**{"optim.frozen": "('text/.*', 'logit_scale')", "optim.lr": "1e-2"})
    before, after, _ = _train(cfg)
    assert not _changed(before["text"], after["text"])
    assert np.array_equal(before["logit_scale"], after["logit_scale"])
    assert _changed(before["image"], after["image"])


def test_without_frozen_both_towers_change():
    before, after, _ = _train(tiny_config(**{"optim.lr": "1e-2"}))
    assert _changed(before["image"], after["image"]) and _changed(before["text"], after["text"])


def _state_bytes(opt_state) -> int:
    return sum(x.size for x in jax.tree.leaves(opt_state))


def test_frozen_parameters_have_no_optimizer_state():
    frozen_cfg = tiny_config(**{"optim.frozen": "('image/.*',)"})
    _, params, tx = _tiny_clip(frozen_cfg)
    _, _, plain_tx = _tiny_clip(tiny_config())
    frozen_state = jax.eval_shape(tx.init, params)
    moments = sorted(x.shape for x in jax.tree.leaves(frozen_state) if x.ndim > 0)
    others = {k: v for k, v in params.items() if k != "image"}
    assert moments == sorted(2 * [p.shape for p in jax.tree.leaves(others) if p.ndim > 0])
    image_size = sum(x.size for x in jax.tree.leaves(params["image"]))
    plain_state = jax.eval_shape(plain_tx.init, params)
    assert _state_bytes(plain_state) - _state_bytes(frozen_state) == 2 * image_size


def test_trained_leaves_get_plain_adamw_updates():
    """With the image tower frozen, the text tower's update is AdamW's on the text alone."""
    cfg = tiny_config(**{"optim.frozen": "('image/.*', 'logit_scale')"})
    graphdef, params, tx = _tiny_clip(cfg)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    mask = decay_mask(nnx.split(nnx.merge(graphdef, params))[1])
    text_only = {"text": params["text"]}
    plain, _ = make_optimizer(
        config_lib.from_dict(cfg.optim.to_dict() | {"frozen": ()}),
        cfg.train.steps,
        {"text": mask["text"]},
    )
    expected, _ = plain.update({"text": grads["text"]}, plain.init(text_only), text_only)
    for ours, theirs in zip(
        jax.tree.leaves(updates["text"]), jax.tree.leaves(expected["text"]), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert all(not np.any(u) for u in jax.tree.leaves(updates["image"]))


def test_a_frozen_pattern_matching_nothing_is_an_error():
    tree = {"image": {"proj": 1}, "text": {"proj": 2}}
    assert frozen_labels(tree, ("image/.*",)) == {
        "image": {"proj": "frozen"},
        "text": {"proj": "trained"},
    }
    with pytest.raises(ValueError, match=r"\['imgae/.\*'\] match no parameter"):
        frozen_labels(tree, ("imgae/.*",))


def test_config_has_init_from_and_frozen_keys():
    cfg = config_lib.base_config()
    assert cfg.init["from"] == "" and tuple(cfg.optim.frozen) == ()
    lit = config_lib.load_config("lit_b16")
    assert tuple(lit.optim.frozen) == ("image/.*",) and lit.data.tokenizer == "clip"


def test_opt_state_specs_give_moments_their_parameters_specs():
    from jax.sharding import PartitionSpec

    from jaxclip.optim import opt_state_specs

    for frozen in ("()", "('image/.*',)"):
        _, params, tx = _tiny_clip(tiny_config(**{"optim.frozen": frozen}))
        specs = jax.tree.map(
            lambda p: (
                PartitionSpec(*(["d"] + [None] * (p.ndim - 1))) if p.ndim else PartitionSpec()
            ),
            params,
        )
        abstract_opt = jax.eval_shape(tx.init, params)
        got = opt_state_specs(abstract_opt, specs)
        shapes = jax.tree.leaves(abstract_opt)
        for leaf, spec in zip(
            shapes,
            jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, PartitionSpec)),
            strict=True,
        ):
            assert spec == (
                PartitionSpec("d", *[None] * (leaf.ndim - 1)) if leaf.ndim else PartitionSpec()
            )
    plain_tx = _tiny_clip(tiny_config())[2]
    reference = optax.tree_map_params(
        plain_tx, lambda _, s: s, jax.eval_shape(plain_tx.init, params), specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )  # fmt: skip
    assert opt_state_specs(jax.eval_shape(plain_tx.init, params), specs) == reference
