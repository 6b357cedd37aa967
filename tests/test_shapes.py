"""Tests of the shapes world: determinism, splits, rendering, captions, pickling."""

import pickle
from collections import Counter

import numpy as np
import pytest

from jaxclip.data import shapes
from jaxclip.data.shapes import ShapesWorld, combo_id, sample_scene


def _same_example(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("image", "mask", "depth", "combo")) and (
        a["caption"],
        a["key"],
    ) == (b["caption"], b["key"])


def test_same_index_gives_identical_example_across_instances():
    a, b = ShapesWorld(num_examples=50), ShapesWorld(num_examples=50)
    for i in (0, 7, 49):
        assert _same_example(a[i], b[i])


def test_different_seeds_give_different_images():
    a, b = ShapesWorld(num_examples=10, seed=0), ShapesWorld(num_examples=10, seed=1)
    assert not np.array_equal(a[3]["image"], b[3]["image"])


def test_val_stream_is_independent_of_train():
    train, val = ShapesWorld("train", 10), ShapesWorld("val", 10)
    assert not np.array_equal(train[0]["image"], val[0]["image"])


def test_example_fields_have_fixed_shapes_and_dtypes():
    ex = ShapesWorld(num_examples=5, image_size=48)[2]
    assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (48, 48) and ex["mask"].dtype == np.uint8
    assert ex["depth"].shape == (48, 48) and ex["depth"].dtype == np.float32
    for k in ("shape", "colour", "size", "combo", "num_objects"):
        assert ex[k].dtype == np.int32 and ex[k].shape == ()
    assert ex["key"] == "train/000002"
    assert ex["combo"] == combo_id(int(ex["shape"]), int(ex["colour"]))


def test_held_out_combos_cover_every_shape_and_each_colour_at_most_once():
    shapes_, colours = zip(*shapes.HELD_OUT_COMBOS, strict=True)
    assert sorted(shapes_) == list(range(len(shapes.SHAPES)))
    assert len(set(colours)) == len(colours)
    assert not set(shapes.HELD_OUT_COMBOS) & set(shapes.ALLOWED_COMBOS)


def test_train_split_never_contains_a_held_out_combo():
    held = set(shapes.HELD_OUT_COMBOS)
    seen = set()
    for i in range(3000):
        for obj in sample_scene("train", i, seed=0, max_objects=3).objects:
            assert (obj.shape, obj.colour) not in held
            seen.add((obj.shape, obj.colour))
    assert seen == set(shapes.ALLOWED_COMBOS)


def test_heldout_split_main_objects_are_balanced_held_out_combos():
    n = 8 * 20
    world = ShapesWorld("heldout", num_examples=n)
    counts = Counter((world.scene(i).main.shape, world.scene(i).main.colour) for i in range(n))
    assert set(counts) == set(shapes.HELD_OUT_COMBOS)
    assert set(counts.values()) == {20}


def test_val_single_object_is_balanced_over_allowed_combos():
    n = len(shapes.ALLOWED_COMBOS) * 3
    world = ShapesWorld("val", num_examples=n, single_object=True)
    scenes = [world.scene(i) for i in range(n)]
    assert all(len(s.objects) == 1 for s in scenes)
    counts = Counter((s.main.shape, s.main.colour) for s in scenes)
    assert set(counts) == set(shapes.ALLOWED_COMBOS) and set(counts.values()) == {3}


def test_object_count_respects_max_objects():
    counts = {len(sample_scene("train", i, max_objects=3).objects) for i in range(200)}
    assert counts == {1, 2, 3}


def test_main_object_pixels_show_its_colour():
    world = ShapesWorld("val", num_examples=64, single_object=True)
    for i in range(0, 64, 5):
        ex = world[i]
        pixels = ex["image"][ex["mask"] == ex["shape"] + 1].astype(np.float32)
        assert len(pixels) > 20
        expected = np.array(shapes.COLOUR_RGB[int(ex["colour"])], np.float32)
        # Median: anti-aliased edge pixels (half background) must not dominate.
        assert np.abs(np.median(pixels, 0) - expected).max() <= 12


def test_object_pixels_are_nearer_than_background():
    world = ShapesWorld(num_examples=20)
    for i in range(20):
        ex = world[i]
        obj, bg = ex["depth"][ex["mask"] > 0], ex["depth"][ex["mask"] == 0]
        assert obj.size and bg.size and obj.max() < bg.min()


def test_main_object_is_drawn_nearest():
    world = ShapesWorld(num_examples=50)
    for i in range(50):
        ex, main = world[i], world.scene(i).main
        assert ex["depth"].min() == pytest.approx(main.depth)


def test_background_is_textured_and_dark():
    ex = ShapesWorld(num_examples=5, single_object=True)[0]
    bg = ex["image"][ex["mask"] == 0].astype(np.float32)
    assert bg.std() > 1.0 and bg.max() < 90


def test_short_caption_names_colour_and_shape_unless_dropped():
    world = ShapesWorld(num_examples=300, caption_style="short")
    full = 0
    for i in range(300):
        main, words = world.scene(i).main, world.caption(i).split()
        colour, shape = shapes.COLOURS[main.colour], shapes.SHAPES[main.shape]
        assert colour in words or shape in words
        full += colour in words and shape in words
    assert 0.7 < full / 300 < 0.9  # 10 % drop the colour, 10 % use "shape"


def test_detailed_caption_mentions_every_object():
    world = ShapesWorld(num_examples=100, caption_style="detailed")
    for i in range(100):
        caption = world.caption(i)
        for obj in world.scene(i).objects:
            assert shapes.object_phrase(obj, with_size=True) in caption
        if len(world.scene(i).objects) > 1:
            assert world.scene(i).relation in caption


def test_every_caption_word_is_in_vocabulary():
    vocab = set(shapes.vocabulary())
    for style in shapes.CAPTION_STYLES:
        world = ShapesWorld(num_examples=200, caption_style=style, noise_prob=0.3)
        for i in range(200):
            assert set(world.caption(i).split()) <= vocab
    for task in ("shape", "colour", "combo"):
        for name in shapes.class_names(task):
            for template in shapes.PROMPT_TEMPLATES:
                assert set(template.format(name).split()) <= vocab


def test_class_names_index_matches_labels():
    combos = shapes.class_names("combo")
    assert combos[combo_id(3, 5)] == f"{shapes.COLOURS[5]} {shapes.SHAPES[3]}"
    assert shapes.class_names("shape")[0] == "circle"
    assert shapes.class_names("colour")[0] == "red shape"


def test_noisy_captions_differ_at_roughly_the_configured_rate():
    n, p = 1000, 0.3
    world = ShapesWorld(num_examples=n, noise_prob=p)
    changed = sum(world.caption(i) != world.clean_caption(i) for i in range(n))
    assert 0.2 < changed / n < 0.35


def test_source_survives_pickle_round_trip():
    world = ShapesWorld("val", num_examples=30, image_size=32, noise_prob=0.2)
    clone = pickle.loads(pickle.dumps(world))
    assert repr(clone) == repr(world) and len(clone) == 30
    assert _same_example(clone[11], world[11])


def test_renders_at_224_pixels():
    ex = ShapesWorld(num_examples=3, image_size=224, single_object=True)[1]
    assert ex["image"].shape == (224, 224, 3)
    frac = (ex["mask"] > 0).mean()
    assert 0.02 < frac < 0.35  # one object of 22-55 % of the side


def test_out_of_range_index_raises():
    with pytest.raises(IndexError):
        ShapesWorld(num_examples=5)[5]
