"""Linear and dense probes: exact on constructed features, at chance where nothing is encoded,
above chance after a little training; the dense folder reader; patch features of a tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.data import shapes
from jaxclip.data.images import resize_center_crop
from jaxclip.data.transforms import normalize_images
from jaxclip.evaluate import dense, dense_folder, registry
from jaxclip.evaluate.encoders import Encoders
from jaxclip.evaluate.linear_probe import fit_logistic, probe
from jaxclip.models.layers import l2_normalize
from jaxclip.models.two_tower import build_clip

SHAPE_TASK = "linear_probe:shapes=shape,n=128"
COLOUR_TASK = "linear_probe:shapes=colour,n=128"


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def newton_logistic(x, y, l2, num_classes, steps=30):
    """float64 reference: Newton's method on mean cross-entropy + l2/2 ||W||^2 (bias free)."""
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], 1)
    theta = np.zeros((d + 1, num_classes))
    penalty = np.full((d + 1, num_classes), l2)
    penalty[-1] = 0.0
    onehot = np.eye(num_classes)[y]
    for _ in range(steps):
        p = softmax(xb @ theta)
        grad = xb.T @ (p - onehot) / n + penalty * theta
        # Hessian over (feature, class) pairs: sum_i x x^T (kron) (diag p - p p^T) / n.
        cov = np.einsum("ic,cd->icd", p, np.eye(num_classes)) - np.einsum("ic,id->icd", p, p)
        hess = np.einsum("ia,ib,icd->acbd", xb, xb, cov).reshape((d + 1) * num_classes, -1) / n
        hess += np.diag(penalty.reshape(-1))
        step = np.linalg.lstsq(hess, grad.reshape(-1), rcond=None)[0]  # bias shift: singular
        theta -= step.reshape(d + 1, num_classes)
    return theta


def test_logistic_fit_matches_a_float64_newton_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = rng.integers(0, 3, 60)
    model = fit_logistic(x, y, 1e-2)
    theta = newton_logistic(x, y, 1e-2, 3)
    np.testing.assert_allclose(model.weights, theta[:-1], atol=2e-4)
    ours = softmax(x @ model.weights.astype(np.float64) + model.bias)
    np.testing.assert_allclose(ours, softmax(x @ theta[:-1] + theta[-1]), atol=2e-5)


def clustered(rng, n, classes=4, dim=16, spread=0.1):
    centres = rng.normal(size=(classes, dim))
    y = np.arange(n) % classes
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_probe_on_separable_features_is_exact():
    x, y = clustered(np.random.default_rng(1), 360)
    scores = probe((x[:120], y[:120]), (x[120:240], y[120:240]), (x[240:], y[240:]))
    assert scores["top1"] == 1.0 and scores["val_top1"] == 1.0
    assert scores["chance"] == pytest.approx(0.25) and scores["examples"] == 120
    assert 1e-6 <= scores["l2"] <= 1.0


def test_probe_on_features_unrelated_to_the_labels_is_at_chance():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(360, 16)), np.arange(360) % 4
    scores = probe((x[:120], y[:120]), (x[120:240], y[120:240]), (x[240:], y[240:]))
    assert abs(scores["top1"] - scores["chance"]) < 0.12, scores


def test_patch_majority_and_mean_on_a_hand_made_map():
    labels = np.array([[[1, 1, 0, 2], [1, 0, 2, 0], [255, 255, 3, 3], [255, 255, 3, 2]]])
    # 2x2 patches in row-major order: {1,1,1,0} -> 1; {0,2,2,0} tie -> 0; all ignored; 3.
    assert dense.patch_majority(labels, 2, 4).tolist() == [[1, 0, -1, 3]]
    depth = np.array([[[1.0, 3.0], [np.nan, np.nan]]])
    np.testing.assert_array_equal(dense.patch_mean(depth, 2), [[1.0, 3.0, np.nan, np.nan]])


@pytest.fixture(scope="module")
def shapes_patches():
    """Patch classes and depths of 48 multi-object 32 px scenes on a 4x4 patch grid."""
    world = shapes.ShapesWorld("val", num_examples=48, image_size=32, max_objects=3)
    examples = [world[i] for i in range(48)]
    masks = np.stack([e["mask"] for e in examples]).astype(np.int64)
    depths = np.stack([e["depth"] for e in examples])
    return dense.patch_majority(masks, 4, 9).reshape(-1), dense.patch_mean(depths, 4).reshape(-1)


def test_seg_probe_on_features_encoding_the_mask_scores_one(shapes_patches):
    classes, _ = shapes_patches
    assert len(np.unique(classes)) > 3  # several shapes, not only background
    rng = np.random.default_rng(3)
    features = np.eye(9)[classes] + 0.05 * rng.normal(size=(len(classes), 9))
    half = len(classes) // 2
    scores = dense.seg_probe(features[:half], classes[:half], features[half:], classes[half:], 9)
    assert scores["miou"] == 1.0 and scores["pixel_acc"] == 1.0


def test_depth_probe_on_features_linear_in_depth_has_no_error(shapes_patches):
    _, depth = shapes_patches
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(len(depth), 5))
    features = np.concatenate([2.0 * depth[:, None] - 1.0, noise], axis=1)
    half = len(depth) // 2
    scores = dense.depth_probe(features[:half], depth[:half], features[half:], depth[half:])
    assert scores["rmse"] < 1e-3 and scores["rmse_mean_baseline"] > 0.1, scores


def test_mean_iou_against_a_hand_computed_case():
    pred, truth = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1])
    # class 0: 1 / 2; class 1: 2 / 4 (class 2 is predicted but absent from the truth).
    assert dense.mean_iou(pred, truth) == (pytest.approx(0.5), 2)


# --- Patch features of the towers ------------------------------------------------------------


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_encode_patches_are_the_tokens_that_pooling_sees(pool):
    model = build_clip(
        "mu/8",
        image_size=32,
        embed_dim=16,
        pool=pool,
        text_width=32,
        text_depth=1,
        text_heads=2,
        vocab_size=64,
        context_length=8,
    )

    @nnx.jit
    def outputs(model, images):
        raw = model.image.encode_patches(images, apply_ln_post=False)
        pooled = l2_normalize(model.image.ln_post(raw.mean(1)) @ model.image.proj[...])
        tokens = model.image(images)[1]["tokens"]
        patches, normed = model.encode_patches(images), model.image.ln_post(raw)
        return raw, tokens, patches, normed, pooled, model.encode_image(images)

    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    raw, tokens, patches, normed, pooled, image = outputs(model, images)
    assert raw.shape == (2, 16, 32) and patches.shape == (2, 16, 32)
    np.testing.assert_allclose(raw, tokens, atol=1e-6)
    np.testing.assert_allclose(patches, normed, atol=1e-6)
    if pool == "mean":  # exactly: ln_post(mean of tokens) -> projection -> normalize
        np.testing.assert_allclose(pooled, image, atol=1e-6)


# --- Evaluators on a tiny model --------------------------------------------------------------


def write_dense_folder(root, count=6):
    """count RGB 40x48 images with label and depth PNGs; returns the label arrays."""
    rng = np.random.default_rng(5)
    for sub in ("images", "labels", "depth"):
        (root / sub).mkdir(parents=True)
    labels = {}
    for i in range(count):
        label = rng.integers(0, 3, (40, 48)).astype(np.uint8)
        label[:4] = 255
        pixels = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
        depth = (label.astype(np.uint16) * 1000 + 500) * (label != 255)
        Image.fromarray(depth.astype(np.uint16)).save(root / "depth" / f"im{i}.png")
        labels[f"im{i}"] = label
    return labels


def test_dense_folder_round_trip(tmp_path):
    labels = write_dense_folder(tmp_path)
    pairs = dense_folder.DenseFolder(tmp_path, "seg").pairs
    assert [p.stem for p, _ in pairs] == sorted(labels)
    image, label = dense_folder.read_pair(*pairs[0], 32, 10**8)
    original = Image.open(pairs[0][0])
    np.testing.assert_array_equal(image, resize_center_crop(original, 32))
    # 48x40 -> shorter side 32: 38x32, centre crop from x = 3, i.e. source x 3.75 .. 43.75.
    nearest = Image.fromarray(labels["im0"]).resize(
        (32, 32), Image.Resampling.NEAREST, box=(3.75, 0, 43.75, 40)
    )
    np.testing.assert_array_equal(label, np.asarray(nearest))
    _, depth = dense_folder.read_pair(
        *dense_folder.DenseFolder(tmp_path, "depth").pairs[0], 32, 10**8
    )
    assert depth.dtype == np.int32
    np.testing.assert_array_equal(
        depth, np.where(label == 255, 0, label.astype(np.int32) * 1000 + 500)
    )


def test_missing_label_file_is_a_clear_error(tmp_path):
    write_dense_folder(tmp_path, count=3)
    (tmp_path / "labels" / "im1.png").unlink()
    with pytest.raises(dense_folder.MissingTargetError, match=r"labels/im1\.png"):
        registry.build_evaluators(
            tiny_config(**{"eval.tasks": f"('dense_seg:folder={tmp_path}',)"})
        )


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    write_dense_folder(folder)
    tasks = (SHAPE_TASK, COLOUR_TASK, "dense_depth:shapes=val,n=32", f"dense_seg:folder={folder}")
    cfg = tiny_config(**{"eval.tasks": str(tasks)})
    setup = run_setup.build(cfg, jax.devices())
    params = run_setup.init_state(setup)["params"]
    encoders = Encoders(setup.graphdef, params, setup.mesh, setup.tokenizer, 64)
    return setup, params, encoders, registry.run_all(registry.build_evaluators(cfg), encoders)


def test_untrained_model_probes_shape_at_chance(untrained):
    *_, scores = untrained
    prefix = "linear_probe/shapes_shape"
    assert scores[f"{prefix}/top1"] < scores[f"{prefix}/chance"] + 0.12, scores
    assert scores[f"{prefix}/examples"] == 128


def test_patch_tokens_are_the_models_patch_features(untrained):
    setup, params, encoders, _ = untrained
    images = np.random.default_rng(6).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    model = nnx.merge(setup.graphdef, params)
    expected = nnx.jit(lambda m, x: m.encode_patches(normalize_images(x, jnp.float32)))(
        model, jnp.asarray(images)
    )
    np.testing.assert_allclose(encoders.patch_tokens(images), expected, atol=1e-5)


def test_dense_evaluators_report_their_metrics(untrained):
    *_, scores = untrained
    depth = "dense_depth/shapes_val"
    # Even random patch features carry some depth (brightness, position): below the baseline.
    assert scores[f"{depth}/rmse"] < scores[f"{depth}/rmse_mean_baseline"], scores
    assert scores[f"{depth}/images"] == 32 and scores[f"{depth}/patches"] == 32 * 16
    seg = [k for k in scores if k.startswith("dense_seg/")]
    assert {k.rsplit("/", 1)[1] for k in seg} >= {"miou", "pixel_acc", "images"}
    assert scores[seg[0].rsplit("/", 1)[0] + "/images"] == 3  # half of 6 images held out
    assert 0.0 <= scores[seg[0].rsplit("/", 1)[0] + "/miou"] <= 1.0


def test_briefly_trained_model_probes_colour_better(untrained, tmp_path_factory):
    *_, before = untrained
    cfg = tiny_config(
        **{
            "eval.tasks": f"('{COLOUR_TASK}',)",
            "train.steps": 60,
            "train.checkpoint_every": 60,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "data.batch_size": 32,
            "data.shapes.max_objects": 1,
            "data.shapes.caption_style": "short",
        }
    )
    after = train_lib.train(cfg, tmp_path_factory.mktemp("trained"), progress=False)
    prefix = "linear_probe/shapes_colour"
    assert after[f"eval/{prefix}/top1"] > 4 * after[f"eval/{prefix}/chance"], after
    assert after[f"eval/{prefix}/top1"] > before[f"{prefix}/top1"] + 0.15, (before, after)
