"""Weights in and out: parity with open_clip / transformers fixtures, round trips, clear errors.

The fixtures (``launch/make_clip_fixtures.py``) are tiny random-weight CLIPs built by
open_clip 3.3.0 and transformers 5.23.0, saved in their own formats with their image and text
features for fixed inputs; ``clip_vit_b16_shapes.json`` lists the tensor names and shapes of
full-size ViT-B/16 state dicts from both libraries.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxclip.models.build import build_clip_model
from jaxclip.weights import architectures as arch_lib
from jaxclip.weights import convert, hf_clip_format, open_clip_format
from jaxclip.weights import workdir as workdir_lib
from jaxclip.weights.architectures import WeightsError
from jaxclip.weights.pos_embed import resize_image_pos_embed

FIXTURES = Path(__file__).parent / "fixtures"
OPEN_CLIP_DIR = FIXTURES / "clip_open_clip_tiny"
HF_DIR = FIXTURES / "clip_hf_tiny"
FEATURES = np.load(FIXTURES / "clip_tiny_features.npz")
SOURCES = {"open_clip": OPEN_CLIP_DIR, "hf": HF_DIR}


def _features(cfg, params, images, tokens, mask):
    """Unnormalized image and text features of jaxclip's model with `params`."""
    vocab = params["text"]["token_embed"].shape[0]

    def model_fn():
        return build_clip_model(
            cfg.model, image_size=cfg.data.image_size, vocab_size=vocab, rngs=nnx.Rngs(0)
        )

    graphdef, _ = nnx.split(nnx.eval_shape(model_fn))
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    image, _ = model.image(jnp.asarray(images))
    text, _ = model.text(jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(image), np.asarray(text)


def _assert_close(ours, reference):
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1)
    cosine /= np.linalg.norm(reference, axis=1)
    assert np.abs(ours - reference).max() < 1e-4 * np.abs(reference).max()
    assert cosine.min() > 1 - 1e-6


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_import_reproduces_the_reference_features(fmt):
    foreign = convert.read_foreign(fmt, SOURCES[fmt])
    cfg = convert.imported_config(foreign.arch)
    image, text = _features(
        cfg, foreign.params, FEATURES[f"{fmt}_images"], FEATURES[f"{fmt}_tokens"],
        FEATURES[f"{fmt}_mask"],
    )  # fmt: skip
    _assert_close(image, FEATURES[f"{fmt}_image_features"])
    _assert_close(text, FEATURES[f"{fmt}_text_features"])


def test_a_layout_mistake_breaks_parity():
    """The parity check can fail: q and k swapped in one layer change the features."""
    foreign = convert.read_foreign("open_clip", OPEN_CLIP_DIR)
    blocks = foreign.params["image"]["blocks"]
    blocks["q_kernel"], blocks["k_kernel"] = blocks["k_kernel"], blocks["q_kernel"]
    cfg = convert.imported_config(foreign.arch)
    image, _ = _features(
        cfg, foreign.params, FEATURES["open_clip_images"], FEATURES["open_clip_tokens"],
        FEATURES["open_clip_mask"],
    )  # fmt: skip
    with pytest.raises(AssertionError):
        _assert_close(image, FEATURES["open_clip_image_features"])


def test_architectures_come_from_the_files():
    oc = convert.read_foreign("open_clip", OPEN_CLIP_DIR).arch
    hf = convert.read_foreign("hf", HF_DIR).arch
    assert (oc.act, hf.act) == ("gelu", "quick_gelu")
    for arch in (oc, hf):
        assert (arch.image_size, arch.patch, arch.image_width, arch.image_heads) == (32, 8, 32, 2)
        assert (arch.vocab_size, arch.context_length, arch.embed_dim) == (512, 16, 16)
        assert convert.imported_config(arch).model.image.variant == "mu/8"


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_import_export_import_is_bit_exact(fmt, tmp_path):
    convert.import_weights(fmt, SOURCES[fmt], tmp_path / "imported")
    _, first, _ = workdir_lib.read_params(tmp_path / "imported")
    convert.export_weights(fmt, tmp_path / "imported", tmp_path / "exported")
    convert.import_weights(fmt, tmp_path / "exported", tmp_path / "again")
    _, second, _ = workdir_lib.read_params(tmp_path / "again")
    assert convert.params_equal(first, second)
    original = convert.read_foreign(fmt, SOURCES[fmt]).params
    assert convert.params_equal(first, original)


def test_exported_tensors_equal_the_original_files(tmp_path):
    convert.import_weights("open_clip", OPEN_CLIP_DIR, tmp_path / "w")
    convert.export_weights("open_clip", tmp_path / "w", tmp_path / "oc")
    convert.export_weights("hf", tmp_path / "w", tmp_path / "hf")
    original = load_file(OPEN_CLIP_DIR / convert.OPEN_CLIP_WEIGHTS)
    exported = load_file(tmp_path / "oc" / convert.OPEN_CLIP_WEIGHTS)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert arch_lib.from_hf_config(config) == convert.read_foreign("open_clip", OPEN_CLIP_DIR).arch


def test_imported_workdir_is_params_only_step_zero(tmp_path):
    step_dir = convert.import_weights("hf", HF_DIR, tmp_path / "w")
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert step_dir.name == "0" and meta["params_only"] and meta["imported_from"]["format"] == "hf"
    cfg, params, step = workdir_lib.read_params(tmp_path / "w")
    assert step == 0 and cfg.model.act == "quick_gelu" and cfg.data.image_size == 32
    assert set(params) == {"image", "text", "logit_scale"}


def test_full_size_vit_b16_names_and_shapes_match_open_clip_and_hf():
    reference = json.loads((FIXTURES / "clip_vit_b16_shapes.json").read_text())
    arch = arch_lib.named_architecture("ViT-B-16")
    abstract = workdir_lib.abstract_params(convert.imported_config(arch))
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract)
    for fmt, module in (("open_clip", open_clip_format), ("hf", hf_clip_format)):
        ours = {k: list(v.shape) for k, v in module.to_state_dict(zeros, arch).items()}
        theirs = {k: v for k, v in reference[fmt].items() if not k.endswith("position_ids")}
        assert ours == theirs, fmt


def test_architecture_is_inferred_from_full_size_tensor_shapes():
    reference = json.loads((FIXTURES / "clip_vit_b16_shapes.json").read_text())["open_clip"]
    tensors = {k: np.broadcast_to(np.float32(0), v) for k, v in reference.items()}
    assert open_clip_format.infer_architecture(tensors, "gelu") == arch_lib.NAMED["ViT-B-16"]
    quick = open_clip_format.infer_architecture(tensors, "quick_gelu")
    assert arch_lib.name_of(quick) == "ViT-B-16-quickgelu"


def test_named_architectures_build_the_published_parameter_counts():
    # open_clip's counts for these models (ViT-B/32: 151,277,313; ViT-L/14: 427,616,513).
    expected = {"ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513}
    for name, count in expected.items():
        cfg = convert.imported_config(arch_lib.named_architecture(name))
        abstract = workdir_lib.abstract_params(cfg)
        assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == count, name


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def _tiny_tensors() -> dict[str, np.ndarray]:
    return load_file(OPEN_CLIP_DIR / convert.OPEN_CLIP_WEIGHTS)


def _write(tensors, tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_unknown_architecture_name_is_refused():
    with pytest.raises(WeightsError, match="unsupported architecture 'ViT-Q-99'.*ViT-B-16"):
        arch_lib.named_architecture("ViT-Q-99")


def test_unsupported_open_clip_option_is_refused(tmp_path):
    config = json.loads((OPEN_CLIP_DIR / convert.OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["vision_cfg"]["ls_init_value"] = 1e-5
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    path = _write(_tiny_tensors(), tmp_path)
    with pytest.raises(WeightsError, match="ls_init_value=1e-05 has no counterpart"):
        convert.read_foreign("open_clip", path, str(tmp_path / "cfg.json"))


def test_image_tower_matching_no_variant_is_refused():
    arch = arch_lib.NAMED["ViT-B-16"].replace(image_depth=7)
    with pytest.raises(WeightsError, match=r"\(768, 7, 12, 3072\) matches no jaxclip ViT"):
        convert.imported_config(arch)


def test_missing_tensor_is_named(tmp_path):
    tensors = _tiny_tensors()
    del tensors["visual.ln_post.bias"]
    path = _write(tensors, tmp_path)
    with pytest.raises(WeightsError, match=r"missing 1: visual\.ln_post\.bias"):
        convert.read_foreign("open_clip", path, str(OPEN_CLIP_DIR / convert.OPEN_CLIP_CONFIG))


def test_shape_mismatch_is_named(tmp_path):
    tensors = _tiny_tensors()
    tensors["text_projection"] = np.zeros((32, 8), np.float32)  # embed_dim 8, not 16
    path = _write(tensors, tmp_path)
    model = str(OPEN_CLIP_DIR / convert.OPEN_CLIP_CONFIG)
    with pytest.raises(WeightsError, match=r"text/proj: the weights give \(32, 8\).*\(32, 16\)"):
        convert.import_weights("open_clip", path, tmp_path / "w", model=model)


def test_narrow_towers_need_an_explicit_architecture(tmp_path):
    path = _write(_tiny_tensors(), tmp_path)
    with pytest.raises(WeightsError, match="narrower than 64: pass --model"):
        convert.read_foreign("open_clip", path)


def test_tokenizer_disagreeing_with_the_vocabulary_is_refused(tmp_path):
    base = convert.config_lib.base_config()
    base.data.tokenizer = "clip"  # 49,408 tokens for a 512-row embedding
    with pytest.raises(WeightsError, match="49408 tokens but the weights' text embedding has 512"):
        convert.import_weights("hf", HF_DIR, tmp_path / "w", base=base)


def test_torch_files_without_torch_say_how_to_install_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: .pt files are readable")
    path = tmp_path / "model.pt"
    path.write_bytes(b"not really")
    with pytest.raises(WeightsError, match=r"needs PyTorch.*weights-torch"):
        convert.read_foreign("openai", path)


def test_lift_checkpoint_export_is_refused(tmp_path):
    cfg = convert.config_lib.load_config("demo_lift")
    with pytest.raises(WeightsError, match="LIFT model has no text tower"):
        arch_lib.from_config(cfg, 0)


# ---------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------


def test_position_embedding_resize_keeps_same_size_and_class_token():
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1 + 7 * 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(resize_image_pos_embed(pos, 50), pos)
    resized = resize_image_pos_embed(pos, 1 + 14 * 14)
    assert resized.shape == (197, 5)
    np.testing.assert_array_equal(resized[0], pos[0])


def test_position_embedding_resize_follows_a_smooth_function():
    def sampled(side):
        centers = (np.arange(side) + 0.5) / side  # pixel centres on [0, 1], as resize uses
        y, x = np.meshgrid(centers, centers, indexing="ij")
        grid = np.stack([np.sin(2 * x) + y, np.cos(3 * y) * x], -1).reshape(side * side, 2)
        return np.concatenate([np.ones((1, 2)), grid]).astype(np.float32)

    resized = resize_image_pos_embed(sampled(16), 1 + 24 * 24)
    inner = sampled(24)[1:].reshape(24, 24, 2)[2:-2, 2:-2]  # away from the border handling
    np.testing.assert_allclose(resized[1:].reshape(24, 24, 2)[2:-2, 2:-2], inner, atol=2e-3)


def test_import_at_another_image_size_interpolates(tmp_path):
    convert.import_weights("hf", HF_DIR, tmp_path / "w", image_size=48)
    cfg, params, _ = workdir_lib.read_params(tmp_path / "w")
    assert cfg.data.image_size == 48 and params["image"]["pos_embed"].shape == (1 + 36, 32)
