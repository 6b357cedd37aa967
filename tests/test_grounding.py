"""The grounding probe (same-image AUC, linear-map recall) and the unseen zero-shot prompts."""

import itertools

import jax
import numpy as np
import pytest
from tiny import tiny_config
from training_processes import saved_params

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.data import records, shapes
from jaxclip.evaluate import datasets, registry
from jaxclip.evaluate import templates as templates_lib
from jaxclip.evaluate.encoders import Encoders
from jaxclip.evaluate.grounding import linear_map_recall, same_image_auc, shapes_captions


def brute_force_auc(emb: np.ndarray, ids: np.ndarray) -> float:
    """Float64 AUC by comparing every same-image pair with every different-image pair."""
    emb = np.float64(emb) / np.linalg.norm(emb, axis=-1, keepdims=True)
    pos, neg = [], []
    for i, j in itertools.combinations(range(len(emb)), 2):
        (pos if ids[i] == ids[j] else neg).append(float(emb[i] @ emb[j]))
    pos, neg = np.array(pos)[:, None], np.array(neg)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# --- Same-image AUC ---------------------------------------------------------------------------


def test_auc_is_one_when_the_captions_of_an_image_embed_alike():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20), 3)
    emb = rng.normal(size=(20, 8))[ids]
    assert same_image_auc(emb, ids) == 1.0


def test_auc_of_unrelated_embeddings_is_one_half():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(100), 4)
    assert abs(same_image_auc(rng.normal(size=(400, 16)), ids) - 0.5) < 0.03


def test_auc_equals_brute_force_pair_counting_ties_included():
    rng = np.random.default_rng(2)
    ids = np.repeat(np.arange(6), [2, 3, 1, 4, 2, 3])
    # Integer vectors in 2-D: many pairs have exactly equal cosines.
    emb = rng.integers(-2, 3, size=(len(ids), 2)).astype(np.float64) + np.array([0.0, 0.1])
    want = brute_force_auc(emb, ids)
    assert same_image_auc(emb, ids) == pytest.approx(want, abs=1e-12)
    assert 0.0 < want < 1.0


def test_pairs_of_the_same_string_are_left_out():
    # Images 0 and 1 share one caption string: that cross-image pair has cosine 1.
    base = np.eye(4)
    emb = base[[0, 2, 1, 2, 3, 3]] + 0.1 * base[[0, 0, 1, 1, 3, 3]]
    ids = np.array([0, 0, 1, 1, 2, 2])
    text_ids = np.array([0, 1, 2, 1, 3, 4])  # rows 1 and 3 are the same string
    assert same_image_auc(emb, ids) < 1.0
    assert same_image_auc(emb, ids, text_ids) == 1.0


# --- Linear map recall ------------------------------------------------------------------------


def test_an_exact_linear_relation_is_recovered():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(120, 12))
    ids = np.repeat(np.arange(120), 3)
    texts = images[ids] @ rng.normal(size=(12, 20))  # text = A image, for every caption
    result = linear_map_recall(texts, ids, images)
    assert result["r1"] == 1.0 and result["r5"] == 1.0
    assert result["chance_r1"] == 1 / 60
    assert linear_map_recall(texts, ids, images, ridge=1e-3)["r1"] == 1.0


def test_texts_unrelated_to_the_images_map_at_chance():
    rng = np.random.default_rng(4)
    ids = np.repeat(np.arange(400), 2)
    result = linear_map_recall(rng.normal(size=(800, 16)), ids, rng.normal(size=(400, 16)))
    assert result["r1"] < 3 * result["chance_r1"] and result["r5"] < 0.05


# --- Zero-shot prompts the captions never use --------------------------------------------------


def all_short_captions() -> set[str]:
    """Every short caption the shapes world can write (its detailed ones name a size)."""
    phrases = [*shapes.SHAPES, *shapes.class_names("colour"), *shapes.class_names("combo")]
    return {t.format(p) for t in shapes.PROMPT_TEMPLATES for p in phrases}


def test_unseen_prompts_are_no_training_caption_and_use_known_words_only():
    unseen = templates_lib.ensemble("shapes_unseen")
    prompts = {t.format(p) for t in unseen for task in ("shape", "colour", "combo")
               for p in shapes.class_names(task)}  # fmt: skip
    assert not prompts & all_short_captions()
    assert not any(w in shapes.SIZES for p in prompts for w in p.split())
    world = shapes.ShapesWorld("train", num_examples=3000, max_objects=1)
    assert not prompts & {world.clean_caption(i) for i in range(3000)}
    tokenizer = shapes.shapes_tokenizer()
    tokens, _ = tokenizer(sorted(prompts))
    assert not (tokens == tokenizer.token_to_id("<unk>")).any()


def test_unseen_aliases_prompt_with_the_unseen_ensemble():
    cfg = tiny_config(**{"eval.tasks": "('zeroshot_combo_heldout_unseen', 'zeroshot_colour')"})
    evaluators = registry.build_evaluators(cfg)
    unseen = evaluators["zeroshot_combo_heldout_unseen"]
    assert unseen.templates == templates_lib.SHAPES_UNSEEN_TEMPLATES
    assert unseen.prefix == "zeroshot_combo_heldout_unseen"
    assert not set(unseen.texts()) & set(evaluators["zeroshot_colour"].texts())


# --- The evaluator on a tiny model ------------------------------------------------------------


def test_shapes_images_get_their_detailed_and_three_short_captions():
    scene = shapes.sample_scene("val", 5)
    captions = shapes_captions(scene, 5)
    assert captions[0] == shapes.detailed_caption(scene) and len(set(captions)) == 4
    assert all(c in all_short_captions() for c in captions[1:])


def grounding_config(**overrides):
    return tiny_config(**{"eval.tasks": "('grounding',)", "eval.num_examples": 128, **overrides})


def grounding_scores(cfg, encoders):
    return registry.run_all(registry.build_evaluators(cfg), encoders)


# One briefly trained run, also with a fixed temperature (loss.learn_scale=false): its saved
# logit scale must be bit-identical to the untrained parameters' (same seed, same model).
TRAINING = {
    "train.steps": 80,
    "train.checkpoint_every": 80,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 20,
    "data.batch_size": 32,
    "data.shapes.max_objects": 1,
    "data.shapes.caption_style": "short",
    "loss.learn_scale": False,
}


@pytest.fixture(scope="module")
def untrained():
    cfg = grounding_config(**TRAINING)
    setup = run_setup.build(cfg, jax.devices()[:1])  # one device: the cheapest tiny run
    params = jax.tree.map(np.array, run_setup.init_state(setup)["params"])
    return cfg, Encoders(setup.graphdef, params, setup.mesh, setup.tokenizer, 128), params


@pytest.fixture(scope="module")
def trained(untrained, tmp_path_factory):
    cfg = untrained[0]
    workdir = tmp_path_factory.mktemp("trained")
    results = train_lib.train(cfg, workdir, devices=jax.devices()[:1], progress=False)
    return results, saved_params(cfg, workdir, num_devices=1)


def test_untrained_model_maps_at_chance_and_training_grounds_its_texts(untrained, trained):
    cfg, encoders, _ = untrained
    before = grounding_scores(cfg, encoders)
    assert before["grounding/images"] == 128 and before["grounding/texts"] == 4 * 128
    chance = before["grounding/chance_r1"]
    assert chance == 1 / 64
    assert before["grounding/map_r1"] < 3 * chance, before
    after = {k.removeprefix("eval/"): v for k, v in trained[0].items()}
    assert after["grounding/map_r1"] > 3 * chance, after
    assert after["grounding/same_image_auc"] > before["grounding/same_image_auc"] + 0.05


def test_a_fixed_temperature_stays_bit_identical_while_the_towers_train(untrained, trained):
    cfg, _, start = untrained
    end = trained[1]
    assert start["logit_scale"] == np.float32(cfg.model.init_logit_scale)
    assert end["logit_scale"].tobytes() == start["logit_scale"].tobytes()
    leaves = zip(jax.tree.leaves(start), jax.tree.leaves(end), strict=True)
    moved = [not np.array_equal(a, b) for a, b in leaves]
    assert sum(moved) == len(moved) - 1  # every other parameter moved


def write_records(directory, captions_per_image: int):
    from data_fixtures import encode, example

    encoded = []
    for i in range(8):
        image, caption, _ = example(i, (36, 44))
        captions = [caption, f"{caption} again"][:captions_per_image]
        encoded.append(records.encode_record(f"k{i}", encode(image), captions))
    records.write_dataset(directory, encoded, name="tiny", num_shards=1)
    return directory


def test_converted_records_with_several_captions_are_probed(untrained, tmp_path):
    _, encoders, _ = untrained
    task = f"grounding:records={write_records(tmp_path / 'two', 2)}"
    cfg = grounding_config(**{"eval.tasks": repr((task,))})
    scores = grounding_scores(cfg, encoders)
    assert scores["grounding/two/images"] == 8 and scores["grounding/two/texts"] == 16
    assert 0.0 <= scores["grounding/two/same_image_auc"] <= 1.0


def test_a_set_with_one_caption_per_image_is_refused_saying_why(tmp_path):
    task = f"grounding:records={write_records(tmp_path / 'one', 1)}"
    cfg = grounding_config(**{"eval.tasks": repr((task,))})
    evaluator = registry.build_evaluators(cfg)[task]
    with pytest.raises(datasets.EvalDataError, match="several captions per image"):
        evaluator.texts()
