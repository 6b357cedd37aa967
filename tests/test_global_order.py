"""The shapes world's global order: the same global batches, and the same position after a
resume, whatever the number of processes and data workers that read them."""

import json

import grain
import numpy as np
import pytest
from test_train import assert_trees_close, index_sums, saved_params
from tiny import tiny_config

from jaxclip import train as train_lib
from jaxclip.checkpoint import CheckpointError
from jaxclip.data.global_order import GlobalOrderLoader, GlobalOrderSampler

NUM_RECORDS, GLOBAL_BATCH, SEED = 40, 8, 3


class Numbers:
    """A data source whose record i is the number i."""

    def __len__(self):
        return NUM_RECORDS

    def __getitem__(self, i):
        return {"key": np.int64(i)}

    def __repr__(self):
        return f"Numbers({NUM_RECORDS})"


def loader(process_index: int, process_count: int, worker_count: int) -> GlobalOrderLoader:
    local = GLOBAL_BATCH // process_count
    sampler = GlobalOrderSampler(
        NUM_RECORDS,
        seed=SEED,
        process_batch=local,
        worker_count=worker_count,
        process_index=process_index,
        process_count=process_count,
    )
    batch = grain.transforms.Batch(local, drop_remainder=True)
    return GlobalOrderLoader(data_source=Numbers(), sampler=sampler, operations=[batch])


def global_batches(process_count: int, worker_count: int, count: int, start: int = 0):
    """The global batches `start`..`start+count`: every process's rows, concatenated."""
    per_process = []
    for p in range(process_count):
        data = loader(p, process_count, worker_count)
        iterator = iter(data)
        if start:
            iterator.set_state(data.state_after(iterator, start))
        per_process.append([next(iterator)["key"].tolist() for _ in range(count)])
    return [sum((rows[i] for rows in per_process), []) for i in range(count)]


def plain_order(count: int) -> list[list[int]]:
    """An independent reference: one shuffled order, epoch after epoch, cut into batches."""
    sampler = GlobalOrderSampler(NUM_RECORDS, seed=SEED, process_batch=GLOBAL_BATCH)
    keys = [sampler.record_key(position) for position in range(count * GLOBAL_BATCH)]
    return [keys[i : i + GLOBAL_BATCH] for i in range(0, len(keys), GLOBAL_BATCH)]


def test_the_order_is_a_permutation_per_epoch_that_changes_between_epochs():
    batches = plain_order(2 * NUM_RECORDS // GLOBAL_BATCH)
    first, second = sum(batches[:5], []), sum(batches[5:], [])
    assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))
    assert first != second


@pytest.mark.parametrize("process_count, worker_count", [(1, 0), (2, 0), (4, 1), (1, 2), (2, 3)])
def test_global_batches_do_not_depend_on_processes_or_data_workers(process_count, worker_count):
    """grain gives each data worker every W-th record and takes the workers' batches in
    turn; the sampler must undo that, or batches would change with the worker count."""
    assert global_batches(process_count, worker_count, 7) == plain_order(7)


@pytest.mark.parametrize(
    "process_count, worker_count, batches", [(1, 0, 3), (2, 0, 5), (1, 2, 5), (2, 3, 7)]
)
def test_state_after_n_batches_is_the_state_reached_by_reading_them(
    process_count, worker_count, batches
):
    for p in range(process_count):
        data = loader(p, process_count, worker_count)
        read = iter(data)
        for _ in range(batches):
            next(read)
        fresh = iter(data)
        assert json.loads(data.state_after(fresh, batches)) == json.loads(read.get_state())


@pytest.mark.parametrize("process_count, worker_count", [(1, 0), (2, 3)])
def test_a_loader_put_at_a_step_continues_the_global_order(process_count, worker_count):
    assert global_batches(process_count, worker_count, 4, start=6) == plain_order(10)[6:]


def test_resume_with_another_worker_count_equals_an_uninterrupted_run(tmp_path):
    """The checkpoint's iterator state was written without data workers; the rerun has two.
    grain cannot restore that state; the position is recomputed from the step instead."""
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


def test_another_layout_and_another_batch_size_are_refused_with_the_setting_named(tmp_path):
    train_lib.train(tiny_config(**{"train.steps": 2}), tmp_path, progress=False)
    other = tiny_config(**{"train.steps": 4, "data.worker_count": 1, "data.batch_size": 32})
    with pytest.raises(CheckpointError, match=r"data\.batch_size: saved 16, now 32"):
        train_lib.train(other, tmp_path, progress=False)
