"""Evaluators: at chance for an untrained model, above chance after a little training."""

import jax
import numpy as np
import pytest
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.evaluate import registry, run
from jaxclip.evaluate.encoders import Encoders
from jaxclip.evaluate.retrieval import first_hit_ranks, recall_at_k

TASKS = "('zeroshot_shape', 'zeroshot_colour', 'zeroshot_combo_heldout', 'retrieval')"


def eval_config(**overrides):
    return tiny_config(**{"eval.tasks": TASKS, "eval.num_examples": 256, **overrides})


def scores_of(setup, state):
    cfg = setup.cfg
    encoders = Encoders(setup.graphdef, state["params"], setup.mesh, setup.tokenizer, 256)
    return registry.run_all(registry.build_evaluators(cfg), encoders)


def test_recall_at_k_against_a_hand_computed_case():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.1, 0.7, 0.6]])
    relevant = np.eye(3, dtype=bool)
    # Query 0 ranks itself first; query 1 ranks itself second; query 2 ranks itself second.
    ranks = first_hit_ranks(sim, relevant)
    assert ranks.tolist() == [0, 1, 1]
    assert recall_at_k(ranks, ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: 1.0}


def test_untrained_model_is_at_chance():
    cfg = eval_config()
    setup = run_setup.build(cfg, jax.devices())
    scores = scores_of(setup, run_setup.init_state(setup))
    # Balanced evaluation sets: a constant guess scores exactly chance; allow the noise of a
    # random model (256 examples) but nothing like a trained one.
    for task in ("zeroshot_shape", "zeroshot_colour", "zeroshot_combo_heldout"):
        assert scores[f"{task}/top1"] < scores[f"{task}/chance"] * 2.2 + 0.03, (task, scores)
    assert scores["retrieval/i2t_r1"] < 0.1 and scores["retrieval/t2i_r1"] < 0.1, scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    cfg = eval_config(
        **{
            "train.steps": 150,
            "train.checkpoint_every": 150,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "data.batch_size": 32,
            "data.shapes.max_objects": 1,
            "data.shapes.caption_style": "short",
            "model.image.variant": "mu/8",
        }
    )
    results = train_lib.train(cfg, workdir, progress=False)
    return cfg, workdir, results


def test_trained_model_is_above_chance(trained):
    _, _, results = trained
    # Colour and retrieval are learned within 150 tiny steps; shape takes far longer (the
    # demo benchmark measures it), so it is not asserted here.
    assert results["eval/zeroshot_colour/top1"] > 4 * results["eval/zeroshot_colour/chance"]
    assert results["eval/retrieval/t2i_r5"] > 3 * 5 * results["eval/retrieval/chance_r1"]


def test_eval_of_a_saved_step_reproduces_the_training_evaluation(trained, tmp_path):
    cfg, workdir, results = trained
    saved, step = run.saved_config(workdir)
    assert step == 150 and saved.model.to_dict() == cfg.model.to_dict()
    scores = run.evaluate_checkpoint(saved, workdir, step, devices=jax.devices()[:2])
    for name, value in scores.items():
        assert value == pytest.approx(results[f"eval/{name}"], abs=1e-6), name
    path = run.write_results(tmp_path, step, scores)
    assert path.name == "eval_step_150.json"
