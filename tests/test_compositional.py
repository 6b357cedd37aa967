"""Compositional hard negatives: every negative is false of its scene, scores follow the
embeddings, an untrained model sits at 50%, a briefly trained one tells attributes apart."""

import json

import jax
import numpy as np
import pytest
from PIL import Image
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.data import shapes
from jaxclip.evaluate import compositional, datasets, registry
from jaxclip.evaluate.encoders import Encoders
from jaxclip.evaluate.hard_negatives import (
    CATEGORIES,
    CaptionGrammarError,
    caption_is_true,
    hard_negatives,
)

# Captions reach 20 words (three objects plus an added one): room for all of them.
LONG_TEXT = {"model.text.context_length": 24, "data.context_length": 24}


def _object(shape, colour, size, x, y):
    return shapes.SceneObject(shape, colour, size, x, y, 0.3, 1.0, (0.0, 0.0, 0.0))


def _scene(*objects):
    return shapes.Scene(tuple(objects), (0, 0, 0), (0, 0, 0), 0)


# --- Negatives and the checker ------------------------------------------------------------


def test_checker_on_a_hand_made_scene():
    red_circle = _object(0, 0, 1, x=0.2, y=0.5)  # large red circle, left
    blue_square = _object(1, 5, 0, x=0.8, y=0.4)  # small blue square, right
    scene = _scene(red_circle, blue_square)
    assert caption_is_true(scene, "a large red circle left of a small blue square")
    assert caption_is_true(scene, "a small blue square right of a large red circle")
    assert caption_is_true(scene, "a small blue square")  # a phrase may leave objects out
    assert not caption_is_true(scene, "a large red circle right of a small blue square")
    assert not caption_is_true(scene, "a large red circle above a small blue square")
    assert not caption_is_true(scene, "a small red circle left of a small blue square")
    # One red circle cannot be two objects.
    assert not caption_is_true(scene, "a large red circle left of a large red circle")
    assert not caption_is_true(
        scene, "a large red circle left of a small blue square and a small blue square"
    )
    with pytest.raises(CaptionGrammarError, match="expected a colour at word 3"):
        caption_is_true(scene, "a large circle")


def test_no_negative_is_true_of_its_scene_and_the_positive_always_is():
    built = dict.fromkeys(CATEGORIES, 0)
    for index in range(300):
        scene = shapes.sample_scene("val", index, seed=0, max_objects=3)
        positive = shapes.detailed_caption(scene)
        assert caption_is_true(scene, positive), positive
        for category, negative in hard_negatives(scene, (0, index)).items():
            assert not caption_is_true(scene, negative), (category, positive, negative)
            assert negative != positive
            built[category] += 1
    # Every category is built for most scenes it can be (2+ objects for relations, swaps).
    multi = sum(len(shapes.sample_scene("val", i, 0, 3).objects) > 1 for i in range(300))
    assert min(built["replace_obj"], built["replace_att"], built["add_obj"]) >= 295, built
    assert min(built["swap_att"], built["replace_rel"], built["swap_obj"]) >= 0.9 * multi, built


def test_negatives_are_deterministic_and_seeded_by_the_key():
    scene = shapes.sample_scene("val", 7, seed=0, max_objects=3)
    assert hard_negatives(scene, (0, 7)) == hard_negatives(scene, (0, 7))
    keys = [hard_negatives(scene, (0, k)) for k in range(20)]
    assert len({tuple(sorted(n.items())) for n in keys}) > 1


def test_evaluator_texts_are_every_caption_in_a_stable_order():
    cfg = tiny_config(**{"eval.num_examples": 16})
    first = compositional.Compositional(cfg, "compositional:shapes=val")
    again = compositional.Compositional(cfg, "compositional:shapes=val")
    assert first.texts() == again.texts()
    assert {t for p in first.pairs for t in (p.positive, p.negative)} == set(first.texts())
    assert len({p.image for p in first.pairs}) == 16


# --- SugarCrepe files and known embeddings --------------------------------------------------

RED, BLUE = (230, 20, 20), (20, 20, 230)


@pytest.fixture
def sugarcrepe_dir(tmp_path):
    (tmp_path / "images").mkdir()
    for name, colour in (("red.png", RED), ("blue.png", BLUE)):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "images" / name)

    def write(category, entries):
        rows = {
            str(k): dict(zip(("filename", "caption", "negative_caption"), e, strict=True))
            for k, e in enumerate(entries)
        }
        (tmp_path / f"{category}.json").write_text(json.dumps(rows))

    write(
        "replace_att",
        [
            ("red.png", "red one", "blue one"),  # correct
            ("blue.png", "blue one", "red one"),  # correct
            ("red.png", "wrong", "right"),  # wrong
        ],
    )
    write(
        "swap_obj",
        [
            ("blue.png", "blue one", "blue one"),  # tie: one half
            ("red.png", "red one", "wrong"),  # correct
            ("missing.png", "red one", "blue one"),  # unreadable image: skipped
        ],
    )
    return tmp_path


class TableEncoders:
    """Embeddings by hand: an image is its dominant colour channel, a text its table row."""

    batch_size = 2
    TEXTS = {"red one": [1, 0.2], "blue one": [0.1, 1], "wrong": [-1, 0], "right": [1, 0.1]}

    def images(self, images):
        mean = images.reshape(len(images), -1, 3).mean(1)
        return np.stack([[1.0, 0.0] if r > b else [0.0, 1.0] for r, _, b in mean])

    def texts(self, texts):
        emb = np.array([self.TEXTS[t] for t in texts], np.float64)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_sugarcrepe_accuracy_with_known_embeddings(sugarcrepe_dir):
    cfg = tiny_config()
    evaluator = compositional.Compositional(cfg, f"compositional:sugarcrepe={sugarcrepe_dir}")
    scores = evaluator.run(TableEncoders())
    assert scores == {
        "compositional/sugarcrepe/replace_att": pytest.approx(2 / 3),
        "compositional/sugarcrepe/swap_obj": 0.75,
        "compositional/sugarcrepe/mean": pytest.approx((2 / 3 + 0.75) / 2),
        "compositional/sugarcrepe/examples": 2.0,
        "compositional/sugarcrepe/skipped": 1.0,
    }
    assert evaluator.texts() == ["red one", "blue one", "wrong", "right"]


def test_sugarcrepe_n_takes_a_subset_per_category(sugarcrepe_dir):
    task = f"compositional:sugarcrepe={sugarcrepe_dir},n=1,name=tiny"
    scores = compositional.Compositional(tiny_config(), task).run(TableEncoders())
    assert scores["compositional/tiny/replace_att"] == 1.0  # the first entry only
    assert scores["compositional/tiny/swap_obj"] == 0.5


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not readable JSON"),
        ('["a", "list"]', "the file is not a non-empty JSON object"),
        ('{"0": {"filename": "red.png", "caption": "red one"}}', "entry '0' is not an object"),
    ],
)
def test_a_malformed_sugarcrepe_file_is_named_in_the_error(sugarcrepe_dir, content, message):
    (sugarcrepe_dir / "add_obj.json").write_text(content)
    with pytest.raises(datasets.EvalDataError, match=message) as err:
        compositional.Compositional(tiny_config(), f"compositional:sugarcrepe={sugarcrepe_dir}")
    assert "add_obj.json" in str(err.value)


def test_sugarcrepe_layout_errors(sugarcrepe_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(datasets.EvalDataError, match="holds no SugarCrepe JSON files"):
        compositional.Compositional(tiny_config(), f"compositional:sugarcrepe={empty}")
    task = f"compositional:sugarcrepe={sugarcrepe_dir},images={empty / 'nowhere'}"
    with pytest.raises(datasets.EvalDataError, match="pass images=DIR"):
        compositional.Compositional(tiny_config(), task)
    with pytest.raises(datasets.EvalDataError, match="compositional:sugarcrepe=DIR"):
        registry.build_evaluators(
            tiny_config(**{"eval.tasks": f"('zeroshot:sugarcrepe={sugarcrepe_dir}',)"})
        )
    with pytest.raises(datasets.EvalDataError, match="reads 'shapes=val' or 'sugarcrepe=DIR'"):
        compositional.Compositional(tiny_config(), f"compositional:folder={empty}")


# --- Real models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained_encoders():
    cfg = tiny_config(**{"eval.tasks": "('compositional',)", "eval.num_examples": 128, **LONG_TEXT})
    setup = run_setup.build(cfg, jax.devices())
    params = run_setup.init_state(setup)["params"]
    return cfg, Encoders(setup.graphdef, params, setup.mesh, setup.tokenizer, 128)


def test_a_negative_equal_to_the_positive_scores_exactly_half(untrained_encoders, tmp_path):
    cfg, encoders = untrained_encoders
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), RED).save(tmp_path / "images" / "red.png")
    same = {
        "0": {"filename": "red.png", "caption": "a red circle", "negative_caption": "a red circle"}
    }
    (tmp_path / "replace_obj.json").write_text(json.dumps(same))
    scores = compositional.Compositional(cfg, f"compositional:sugarcrepe={tmp_path}").run(encoders)
    assert scores["compositional/sugarcrepe/replace_obj"] == 0.5


def test_untrained_model_is_near_half(untrained_encoders):
    cfg, encoders = untrained_encoders
    scores = registry.run_all(registry.build_evaluators(cfg), encoders)
    assert scores["compositional/examples"] == 128
    for category in CATEGORIES:
        assert 0.25 < scores[f"compositional/{category}"] < 0.75, (category, scores)
    assert abs(scores["compositional/mean"] - 0.5) < 0.08, scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_config(
        **{
            "eval.tasks": "('compositional:shapes=val,objects=2',)",
            "eval.num_examples": 128,
            "train.steps": 100,
            "train.checkpoint_every": 100,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "data.batch_size": 32,
            "data.shapes.max_objects": 2,
            "data.shapes.caption_style": "detailed",
            **LONG_TEXT,
        }
    )
    return train_lib.train(cfg, tmp_path_factory.mktemp("trained"), progress=False)


def test_briefly_trained_model_tells_replaced_attributes_apart(trained):
    # 100 steps teach colour and size (0.80-0.86 observed): replace_att is learned. Shape is
    # learned far more slowly, and swapped attributes or relations need more than a bag of
    # words (both ~0.5 after 100-150 steps), so they are not asserted.
    assert trained["eval/compositional/shapes_val/replace_att"] > 0.7, trained
    assert trained["eval/compositional/shapes_val/examples"] == 128
