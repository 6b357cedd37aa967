"""Multi-process runtime: 2 processes x 4 CPU devices (gloo) train like 1 process x 8, agree
on where to stop when one is preempted, and resume, also in 1 process."""

import json
import os
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from test_train import assert_trees_close, index_sums
from training_processes import (
    PREEMPTED,
    Training,
    blocks_sigterm,
    data_workers,
    last_logged_step,
    metrics,
    reference_run,
    saved_params,
    saved_steps,
    write_config,
)

from jaxclip import distributed
from jaxclip import mesh as mesh_lib


def test_two_processes_preempted_and_resumed_train_and_evaluate_like_one_process(tmp_path):
    overrides = {
        "train.steps": 12,
        "train.checkpoint_every": 1000,
        "eval.tasks": "('zeroshot_colour', 'retrieval')",
        "optim.eps": 1e-4,  # see test_train: keeps the comparison about data and sharding
    }
    # The children read data in two grain worker processes each, the reference in none: the
    # global order depends on neither.
    config = write_config(tmp_path, "two_processes", {**overrides, "data.worker_count": 2})
    workdir = tmp_path / "two"
    with Training(
        config, workdir, tmp_path / "first", num_processes=2, devices_per_process=4
    ) as run:
        run.wait_for(lambda: last_logged_step(workdir) >= 2)
        workers = data_workers(run.procs[1].pid)
        assert workers and all(blocks_sigterm(w) for w in workers)  # only their parent stops them
        # Like SLURM, to the process and its data worker; process 0 (the coordinator) gets none.
        os.killpg(run.procs[1].pid, signal.SIGTERM)
        codes = run.wait()
    assert codes == [0, 0], run.all_output()
    assert "process 1 of 2, 4 local / 8 global devices" in run.output(1)
    # Both processes stop after the same step and save it together.
    stopped = [int(PREEMPTED.search(run.output(i))[1]) for i in range(2)]
    assert stopped[0] == stopped[1] < 12, run.all_output()
    assert saved_steps(workdir) == [stopped[0]]
    # The same checkpoint also resumes in one process of 8 devices (without data workers).
    shutil.copytree(workdir, tmp_path / "continued_in_one")

    with Training(
        config, workdir, tmp_path / "second", num_processes=2, devices_per_process=4
    ) as rerun:
        codes = rerun.wait()
    assert codes == [0, 0], rerun.all_output()
    assert f"Resumed from step {stopped[0]}" in rerun.output(0)
    cfg = reference_run(tmp_path / "one", overrides)

    two, one = metrics(workdir), metrics(tmp_path / "one")
    # Only process 0 writes metrics: one record per logged step, not two.
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        # The sum of the record indices over the whole global batch: same data each step.
        assert a.get("train/data/index_sum") == b.get("train/data/index_sum")
        for key in b:
            if key.startswith(("train/loss", "eval/")):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert any(k.startswith("eval/retrieval") for k in two[-1])

    meta = json.loads((workdir / "checkpoints/12/meta/metadata").read_text())
    assert meta["process_count"] == 2
    assert_trees_close(saved_params(cfg, workdir), saved_params(cfg, tmp_path / "one"), rtol=1e-5)

    reference_run(tmp_path / "continued_in_one", overrides)
    # Steps after the preemption read the global batches of the uninterrupted run.
    continued = index_sums(tmp_path / "continued_in_one")
    assert continued == index_sums(tmp_path / "one")
    assert len(set(continued.values())) == 12
    assert_trees_close(
        saved_params(cfg, tmp_path / "continued_in_one"),
        saved_params(cfg, tmp_path / "one"),
        rtol=1e-5,
    )


def test_multi_slice_mesh_puts_only_the_data_axis_across_slices():
    devices = [
        SimpleNamespace(id=i, slice_index=i // 4, platform="cpu", device_kind="cpu")
        for i in range(8)
    ]
    grid = mesh_lib.multi_slice_grid((4, 2, 1), devices, num_slices=2)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert slices.shape == (4, 2, 1)
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
    with pytest.raises(ValueError, match="data axis must be a multiple of 2"):
        mesh_lib.multi_slice_grid((1, 8, 1), devices, num_slices=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="10.0.0.1:1234"), "needs all three"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "must be in"),
    ],
)
def test_incomplete_multi_process_flags_are_refused(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_records_checkpoint_of_two_processes_resumes_in_one_with_other_workers(tmp_path):
    """Converted records, 2 processes x 4 devices with 2 workers each, preempted; continued in
    1 process of 8 devices with 3 workers: the data order and losses of an uninterrupted
    1-process run without workers."""
    from data_fixtures import encode, example

    from jaxclip.data import records

    raws = []
    for i in range(40):
        image, caption, _ = example(i, (20, 16))
        raws.append(records.encode_record(f"k{i}", encode(image), [caption, f"{caption} too"]))
    records.write_dataset(tmp_path / "data", raws, name="data", num_shards=2)
    overrides = {
        "data.source": "records",
        "data.records.paths": str(tmp_path / "data"),
        "data.read_threads": 0,
        "train.steps": 10,
        "train.checkpoint_every": 1000,
        "optim.eps": 1e-4,
    }
    config = write_config(tmp_path, "records", {**overrides, "data.worker_count": 2})
    workdir = tmp_path / "two"
    with Training(
        config, workdir, tmp_path / "logs", num_processes=2, devices_per_process=4
    ) as run:
        run.wait_for(lambda: last_logged_step(workdir) >= 2)
        os.killpg(run.procs[0].pid, signal.SIGTERM)
        os.killpg(run.procs[1].pid, signal.SIGTERM)
        assert run.wait() == [0, 0], run.all_output()
    (stopped,) = saved_steps(workdir)
    assert stopped < 10
    reference_run(workdir, {**overrides, "data.worker_count": 3})  # continues in 1 process
    cfg = reference_run(tmp_path / "one", overrides)
    resumed, straight = metrics(workdir), metrics(tmp_path / "one")
    by_step = {r["step"]: r for r in straight if "train/loss" in r}
    continued = [r for r in resumed if "train/loss" in r and r["step"] > stopped]
    assert [r["step"] for r in continued] == list(range(stopped + 1, 11))
    for row in [r for r in resumed if "train/loss" in r]:
        want = by_step[row["step"]]
        assert row["train/data/index_sum"] == want["train/data/index_sum"], row["step"]
        np.testing.assert_allclose(row["train/loss"], want["train/loss"], rtol=1e-5)
    assert_trees_close(saved_params(cfg, workdir), saved_params(cfg, tmp_path / "one"), rtol=1e-5)
