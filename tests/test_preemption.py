"""Preemption and crashes: SIGTERM saves at an agreed step and exits 0; the same command
resumes exactly; a SIGKILL in the middle of a checkpoint write loses only that checkpoint.

(Two processes preempted and resumed: tests/test_multiprocess.py.)"""

import signal

from test_train import assert_trees_close
from tiny import tiny_config
from training_processes import (
    PREEMPTED,
    Training,
    last_logged_step,
    saved_params,
    saved_steps,
    train_losses,
    write_config,
)

from jaxclip.checkpoint import checkpoint_dir


def test_sigterm_saves_the_step_it_stopped_at_and_the_rerun_resumes_exactly(tmp_path):
    overrides = {"train.steps": 24, "train.checkpoint_every": 1000, "optim.eps": 1e-4}
    config = write_config(tmp_path, "preempted", overrides)
    workdir = tmp_path / "run"
    with Training(config, workdir, tmp_path / "first", devices_per_process=1) as run:
        run.wait_for(lambda: last_logged_step(workdir) >= 2)
        run.procs[0].send_signal(signal.SIGTERM)
        codes = run.wait()
    assert codes == [0], run.all_output()
    stopped = int(PREEMPTED.search(run.output())[1])
    assert 2 <= stopped < 24
    assert saved_steps(workdir) == [stopped]  # checkpoint_every=1000: only the preemption one
    assert last_logged_step(workdir) == stopped

    with Training(config, workdir, tmp_path / "second", devices_per_process=1) as rerun:
        codes = rerun.wait()
    assert codes == [0], rerun.all_output()
    assert f"Resumed from step {stopped}" in rerun.output()

    # The uninterrupted run, also a child process on one device: the same compiled programs
    # (loaded from the session's compilation cache), so equality is exact.
    with Training(config, tmp_path / "reference", tmp_path / "ref", devices_per_process=1) as ref:
        codes = ref.wait()
    assert codes == [0], ref.all_output()
    resumed, reference = train_losses(workdir), train_losses(tmp_path / "reference")
    assert sorted(resumed) == sorted(reference) == list(range(1, 25))
    assert resumed == reference
    cfg = tiny_config(**overrides)
    ours, uninterrupted = (
        saved_params(cfg, w, num_devices=1) for w in (workdir, tmp_path / "reference")
    )
    assert_trees_close(ours, uninterrupted, rtol=0, atol=0)


def test_sigkill_during_a_checkpoint_write_falls_back_to_the_last_complete_one(tmp_path):
    # A 400k-row text embedding makes the state ~200 MB: each save takes a moment to write.
    overrides = {"model.text.vocab_size": 400_000, "train.steps": 5, "train.checkpoint_every": 1}
    config = write_config(tmp_path, "killed", overrides)
    workdir = tmp_path / "run"
    directory = checkpoint_dir(workdir)

    def writing_after_a_complete_one():
        names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    with Training(config, workdir, tmp_path / "first", devices_per_process=1) as run:
        run.wait_for(writing_after_a_complete_one, poll=0.005)
        run.kill()  # SIGKILL while Orbax writes into its temporary directory
    complete = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    incomplete = [p.name for p in directory.iterdir() if "tmp" in p.name]
    assert incomplete, "the kill came too late: no save was in progress"

    with Training(config, workdir, tmp_path / "second", devices_per_process=1) as rerun:
        codes = rerun.wait()
    output = rerun.output()
    assert codes == [0], output
    assert "Ignoring incomplete checkpoint" in output and incomplete[0] in output
    assert f"Resumed from step {complete}" in output
    assert saved_steps(workdir)[-1] == 5
