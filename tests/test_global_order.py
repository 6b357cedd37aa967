"""The global order: the same global batches (records, crops, captions), and the same
position after a resume, whatever the number of processes and data workers that read them,
for the shapes world and for converted records, mixtures included."""

import grain
import numpy as np
import pytest
from data_fixtures import encode, example
from test_train import assert_trees_close, index_sums, saved_params
from tiny import tiny_config

from jaxclip import train as train_lib
from jaxclip.checkpoint import CheckpointError
from jaxclip.data import pipeline, records
from jaxclip.data.global_order import MixtureOrder

GLOBAL_BATCH = 8


def write_records(directory, count: int, offset: int) -> str:
    """`count` small JPEG records with two captions each (a random caption is drawn)."""
    raws = []
    for i in range(offset, offset + count):
        image, caption, _ = example(i, (20, 14))
        raws.append(records.encode_record(f"k{i}", encode(image), [caption, f"{caption} too"]))
    records.write_dataset(directory, raws, name=directory.name, num_shards=2)
    return str(directory)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return [write_records(root / "a", 12, 0), write_records(root / "b", 30, 100)]


def shapes_config(**overrides):
    return tiny_config(**{"data.shapes.num_train": 40, "data.image_size": 16, **overrides})


def records_config(paths, **overrides):
    values = {
        "data.source": "records",
        "data.records.paths": paths,
        "data.image_size": 16,
        "data.augment.crop_scale": "(0.5, 1.0)",  # crops that differ from draw to draw
        "data.augment.flip": True,
        "data.read_threads": 0,
    }
    return tiny_config(**{**values, **overrides})


def global_batches(cfg, process_count: int, worker_count: int, count: int, start: int = 0):
    """Global batches `start`..`start+count`: every process's rows, concatenated per field."""
    per_process = []
    for p in range(process_count):
        with cfg.unlocked():
            cfg.data.worker_count = worker_count
        features = pipeline.TokenizedCaption(pipeline.make_tokenizer(cfg.data))
        batches = pipeline.train_loader(
            cfg.data,
            features,
            GLOBAL_BATCH // process_count,
            start_batch=start,
            process_index=p,
            process_count=process_count,
        )
        per_process.append([next(batches) for _ in range(count)])
        batches.close()
    return [
        {
            name: np.concatenate([rows[i][name] for rows in per_process])
            for name in per_process[0][i]
        }
        for i in range(count)
    ]


def plain_order(sizes, weights, seed, count):
    """An independent reference: positions of the global order cut into batches, as indices
    numbered across the mixture."""
    order = MixtureOrder(sizes, weights, seed)
    offsets = np.cumsum([0, *sizes])
    keys = [int(offsets[d] + r) for d, r in (order[p] for p in range(count * GLOBAL_BATCH))]
    return [keys[i : i + GLOBAL_BATCH] for i in range(0, len(keys), GLOBAL_BATCH)]


def test_the_order_is_a_permutation_per_epoch_that_changes_between_epochs():
    batches = plain_order([40], [1.0], 3, 10)
    first, second = sum(batches[:5], []), sum(batches[5:], [])
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second
    # The shapes world's order of earlier versions: one grain shuffle per epoch.
    shuffled = grain.MapDataset.range(40).shuffle(seed=3)
    assert first + second == [int(shuffled[p]) for p in range(80)]


def test_a_mixture_interleaves_datasets_in_proportion_and_covers_each():
    keys = np.array(sum(plain_order([12, 30], [0.25, 0.75], 0, 50), []))
    from_a = keys < 12
    assert abs(from_a.mean() - 0.25) < 0.02
    for window in np.split(from_a, 4):  # interleaved throughout, not in blocks
        assert abs(window.mean() - 0.25) < 0.05
    counts_a = np.bincount(keys[from_a], minlength=12)
    counts_b = np.bincount(keys[~from_a] - 12, minlength=30)
    assert counts_a.min() >= 8 and counts_a.max() <= 9  # epoch after epoch, no record skipped
    assert counts_b.min() >= 10 and counts_b.max() <= 10


LAYOUTS = [(2, 2), (1, 3), (4, 1)]


@pytest.mark.parametrize("process_count, worker_count", LAYOUTS)
def test_shapes_batches_do_not_depend_on_processes_or_data_workers(process_count, worker_count):
    cfg = shapes_config(**{"data.seed": 3})
    reference = global_batches(cfg, 1, 0, 7)
    assert [b["index"].tolist() for b in reference] == plain_order([40], [1.0], 3, 7)
    for got, want in zip(
        global_batches(cfg, process_count, worker_count, 7), reference, strict=True
    ):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("process_count, worker_count", LAYOUTS)
def test_records_mixture_batches_do_not_depend_on_processes_or_data_workers(
    mixture, process_count, worker_count
):
    """Record keys, random crops and flips, and random captions: all equal, row by row."""
    cfg = records_config(f"{mixture[0]}:0.25,{mixture[1]}:0.75")
    reference = global_batches(cfg, 1, 0, 6)
    assert [b["index"].tolist() for b in reference] == plain_order([12, 30], [0.25, 0.75], 0, 6)
    got = global_batches(cfg, process_count, worker_count, 6)
    for a, b in zip(got, reference, strict=True):
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The draws do vary: not every example got the first caption, nor the same crop.
    tokens = np.concatenate([b["tokens"] for b in reference])
    assert len({t.tobytes() for t in tokens}) > len(
        set(np.concatenate([b["index"] for b in reference]))
    )


@pytest.mark.parametrize("process_count, worker_count", [(1, 0), (2, 3)])
def test_a_loader_started_at_a_step_continues_the_global_order(
    mixture, process_count, worker_count
):
    cfg = records_config(mixture[1])
    straight = global_batches(cfg, 1, 0, 7)
    started = global_batches(cfg, process_count, worker_count, 3, start=4)
    for a, b in zip(started, straight[4:], strict=True):
        for name in b:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_with_another_worker_count_equals_an_uninterrupted_run(tmp_path):
    """The checkpoint was written without data workers; the rerun has two."""
    cfg = tiny_config(**{"train.steps": 6, "train.checkpoint_every": 100, "optim.eps": 1e-4})
    train_lib.train(cfg, tmp_path / "straight", progress=False)
    train_lib.train(cfg, tmp_path / "resumed", stop_at_step=3, progress=False)
    with_workers = tiny_config(
        **{"train.steps": 6, "optim.eps": 1e-4, "data.worker_count": 2, "data.prefetch": 1}
    )
    train_lib.train(with_workers, tmp_path / "resumed", progress=False)

    assert index_sums(tmp_path / "straight") == index_sums(tmp_path / "resumed")
    straight, _ = saved_params(cfg, tmp_path / "straight")
    resumed, _ = saved_params(cfg, tmp_path / "resumed")
    assert_trees_close(straight, resumed, rtol=1e-6, atol=1e-7)


def test_another_batch_size_or_dataset_is_refused_with_the_setting_named(tmp_path, mixture):
    cfg = records_config(mixture[0], **{"train.steps": 2})
    train_lib.train(cfg, tmp_path, progress=False)
    bigger = records_config(mixture[0], **{"train.steps": 4, "data.batch_size": 32})
    with pytest.raises(CheckpointError, match=r"batch_size: saved 16, now 32"):
        train_lib.train(bigger, tmp_path, progress=False)
    other = records_config(mixture[1], **{"train.steps": 4})
    with pytest.raises(CheckpointError, match=r"another data order.*datasets: saved"):
        train_lib.train(other, tmp_path, progress=False)
