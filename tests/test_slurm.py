"""A real SLURM cluster on localhost: launch/submit.py submits the demo as 2 tasks, follows it,
and the job's checkpoint restores in this single process and matches a 1-process run.

The cluster is one node (slurmctld + slurmd from Debian's slurm-wlm) in a temporary
directory, with `auth/none` so no munge daemon is needed, on free ports. It is stopped by
PID afterwards, also when the test fails. Without `sbatch` the test is skipped, unless
JAXCLIP_REQUIRE_SLURM=1 (set by .ci/run) turns that into a failure.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import assert_trees_close
from training_processes import free_port, metrics, reference_run, saved_params, write_config

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DAEMONS = ("slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "scancel", "srun")


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        reason = "SLURM is not installed (no sbatch); apt-get install slurm-wlm to run this test"
        if os.environ.get("JAXCLIP_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (JAXCLIP_REQUIRE_SLURM=1 makes it required)")
        pytest.skip(reason)
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"sbatch exists but {', '.join(missing)} do not: install slurm-wlm")


class LocalSlurm:
    """slurmctld and slurmd for one node on localhost, configured in `root`."""

    NODE = "localhost"

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[subprocess.Popen] = []
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        user = getpass.getuser()
        lines = [
            "ClusterName=jaxclip-test",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            # Local test cluster only: no munge, no credential signing.
            "AuthType=auth/none",
            "CredType=cred/none",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=600",  # keep finished jobs visible to scontrol while the test reads them
            f"NodeName={self.NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000",
            f"PartitionName=debug Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        for command in (
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            ["slurmd", "-D", "-N", self.NODE, "-f", str(self.conf)],
        ):
            log = (self.root / "log" / f"{command[0]}.stdout").open("w")
            self.daemons.append(
                subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(d.poll() is not None for d in self.daemons):
                break
            state = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"the local SLURM node did not come up:\n{self.logs()}")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)

    def requeued_and_idle(self, job_id: int = 1) -> bool:
        job = self.run("scontrol", "show", "job", str(job_id)).stdout
        node = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.strip()
        return "JobState=PENDING" in job and "Restarts=1" in job and node == "idle"

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.root / "log").iterdir())
        )

    def stop(self) -> None:
        """Cancels what is left of the jobs, then stops both daemons by PID."""
        if all(d.poll() is None for d in self.daemons):
            jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
            if jobs:
                self.run("scancel", *jobs)
                deadline = time.monotonic() + 30
                while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()


@pytest.fixture
def slurm_cluster():
    require_slurm()
    # Short path: slurmd puts unix sockets in its spool directory (108-character limit).
    root = Path(tempfile.mkdtemp(prefix="jaxclip-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(condition, what: str, submit: subprocess.Popen, timeout: float = 300) -> None:
    """Polls `condition()`; fails if submit.py exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if submit.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def test_submitted_demo_survives_preemption_and_matches_one_process(slurm_cluster, tmp_path):
    """2 tasks x 4 CPU devices; SIGTERM, as SLURM sends before preemption or the time limit;
    the job checkpoints, requeues itself, resumes and ends like an uninterrupted 1-process run.
    """
    overrides = {"train.steps": 4, "train.checkpoint_every": 2, "optim.eps": 1e-4}
    config = write_config(tmp_path, "slurm_demo", overrides)  # the demo, at test size
    workdir = tmp_path / "job"
    command = [sys.executable, "launch/submit.py", "--cluster", "slurm", "--config", str(config)]
    command += ["--workdir", str(workdir), "--ntasks", "2", "--overcommit", "--requeue"]
    command += ["--wait", "--poll_seconds", "1"]
    command += ["--env", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    command += ["--env", f"PYTHONPATH={TESTS}"]  # the config file imports tests/tiny.py
    command += ["--env", f"JAX_COORDINATOR_PORT={free_port()}"]
    env = dict(slurm_cluster.env, PYTHONPATH=str(TESTS))  # submit.py checks the config too
    submit = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = workdir / "slurm" / "jaxclip-slurm-demo-1.out"  # job 1 on a fresh cluster

    def job_log() -> str:
        return log.read_text() if log.is_file() else ""

    try:
        # While both tasks start up (restore, compile): slurmstepd signals every process of
        # the step, data workers included. The signal must wait for the first step, not die.
        wait_for(lambda: job_log().count(" of 2, 4 local / 8 global") == 2, "both tasks", submit)
        slurm_cluster.run("scancel", "--signal=TERM", "1")
        # Meanwhile: the same config trained uninterrupted by this process (8 devices).
        cfg = reference_run(tmp_path / "one", overrides)
        # SLURM holds a requeued job back for two minutes (BeginTime). Shorten that to a few
        # seconds once the first run has left the node: slurmd refuses a job whose new
        # credential is from the same second as the old one's revocation.
        wait_for(slurm_cluster.requeued_and_idle, "the requeue", submit)
        slurm_cluster.run("scontrol", "update", "JobId=1", "StartTime=now+5")
        stdout, stderr = submit.communicate(timeout=600)
    finally:
        submit.kill()  # a no-op unless something above failed while it was following the job
        detail = f"{job_log()[-6000:]}\n{slurm_cluster.logs()}"
    assert submit.returncode == 0, f"{stdout}\n{stderr[-3000:]}\n{detail}"
    assert "submitted job 1" in stdout and "job 1: RUNNING, restart 1" in stdout
    assert "job 1 ended COMPLETED with exit code 0" in stdout
    assert "--ntasks=2" in (workdir / "slurm" / "jaxclip-slurm-demo.sbatch").read_text()
    # Stopped at a step both processes agreed on, saved it, requeued, resumed from it.
    text = job_log()
    stopped = int(text.split("Preempted at step ")[1].split(":")[0])
    assert 1 <= stopped < 4, detail
    assert "run not finished; requeueing job 1" in text
    assert f"Resumed from step {stopped} in" in text, detail

    meta = json.loads((workdir / "checkpoints/4/meta/metadata").read_text())
    assert meta["process_count"] == 2 and meta["num_devices"] == 8

    job, one = metrics(workdir), metrics(tmp_path / "one")
    assert [r["step"] for r in job] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(job, one, strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5, atol=1e-6)
    # The job's checkpoint restores in this single process and equals the reference.
    assert_trees_close(saved_params(cfg, workdir), saved_params(cfg, tmp_path / "one"), rtol=1e-5)


def test_wait_returns_the_exit_status_of_a_failed_job(slurm_cluster, tmp_path):
    """A job whose tasks fail at once: --wait ends with its exit status and its log's tail."""
    failing = tmp_path / "failing_python"
    failing.write_text("#!/bin/sh\necho 'task failed on purpose' >&2\nexit 7\n")
    failing.chmod(0o755)
    command = [sys.executable, "launch/submit.py", "--cluster", "slurm", "--config", "demo"]
    command += ["--workdir", str(tmp_path / "job"), "--ntasks", "2", "--overcommit"]
    command += ["--python", str(failing), "--wait", "--poll_seconds", "0.5"]
    out = subprocess.run(
        command, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 7, f"{out.stdout}\n{out.stderr}\n{slurm_cluster.logs()}"
    assert "job 1 ended FAILED with exit code 7" in out.stdout
    assert "task failed on purpose" in out.stdout  # the log's tail
