"""SLURM: write an sbatch script, submit it, follow the job to its exit status.

The script starts one `launch/train.py` per task with `srun`; inside each task
`jax.distributed` reads SLURM's variables (coordinator = first node, one process per task).
On GPU nodes JAX gives task i of a node the node's GPU i, so a node runs one task per GPU
and every task must see all of the node's GPUs (`--gpus-per-node`, no per-task binding).

Preemption: `--signal=TERM@N` makes SLURM send SIGTERM to every task N seconds before the
time limit; the trainer then saves a checkpoint at a step all processes agree on and exits 0.
With `--requeue` the script puts itself back in the queue when the run stopped before its
last step, and the next start resumes from that checkpoint. A preempting job that SLURM
requeues itself (PreemptMode=REQUEUE) resumes the same way.

Both of those signal the job *steps* (the tasks), never this script or its `srun`: srun turns
a SIGTERM of its own into SIGKILL of every task ("forcing job termination"). So the notice
must not be `--signal=B:TERM`, and `scancel --full` (which signals the batch script too)
kills the tasks instead of stopping them; `scancel --signal=TERM JOBID` is the graceful one.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from jaxclip.cluster.command import SubmitError, TrainCommand


class SlurmError(RuntimeError):
    """sbatch, scontrol or sacct failed, or the job could not be followed."""


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script says. Paths are absolute: the job runs elsewhere."""

    name: str
    train: TrainCommand
    repo_dir: str
    log_dir: str
    nodes: int = 1
    ntasks: int | None = None  # total tasks; else tasks_per_node x nodes
    ntasks_per_node: int | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None  # SLURM time format, e.g. 04:00:00 or 2-00:00:00
    partition: str | None = None
    account: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    requeue: bool = False
    signal_seconds: int = 120  # SIGTERM this long before the time limit; 0: none
    overcommit: bool = False  # more tasks than CPUs (CPU-only test clusters)
    extra_args: tuple[str, ...] = ()  # further `#SBATCH` options, verbatim

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise SubmitError(
                f"Job name {self.name!r} may only use letters, digits, '.', '_' and '-'."
            )
        if any(c.isspace() for c in self.log_dir):
            raise SubmitError(
                f"SLURM's #SBATCH --output cannot hold a path with spaces ({self.log_dir!r}): "
                f"choose a --workdir without spaces."
            )
        if self.nodes < 1:
            raise SubmitError(f"--nodes={self.nodes}: a job needs at least one node.")
        per_node = self.ntasks_per_node
        if self.gpus_per_node and per_node not in (None, self.gpus_per_node):
            raise SubmitError(
                f"--ntasks_per_node={per_node} with --gpus_per_node={self.gpus_per_node}: under "
                f"SLURM JAX runs one process per GPU (task i uses GPU i of its node). Leave "
                f"--ntasks_per_node unset, or set it to {self.gpus_per_node}."
            )
        if self.ntasks is not None and self.ntasks < self.nodes:
            raise SubmitError(f"--ntasks={self.ntasks} is fewer than --nodes={self.nodes}.")

    @property
    def log_pattern(self) -> str:
        return f"{self.log_dir}/%x-%j.out"

    def log_path(self, job_id: int) -> str:
        return f"{self.log_dir}/{self.name}-{job_id}.out"

    def directives(self) -> list[str]:
        """The `#SBATCH` options, in the order a reader expects them."""
        opts = [f"--job-name={self.name}", f"--nodes={self.nodes}"]
        if self.ntasks is not None:
            opts.append(f"--ntasks={self.ntasks}")
        if self.ntasks_per_node is not None or self.ntasks is None:
            opts.append(f"--ntasks-per-node={self.ntasks_per_node or self.gpus_per_node or 1}")
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            opts.append(f"--cpus-per-task={self.cpus_per_task}")
        for flag, value in (("time", self.time), ("partition", self.partition)):
            if value:
                opts.append(f"--{flag}={value}")
        if self.account:
            opts.append(f"--account={self.account}")
        # Appending keeps one log across requeued restarts of the same job id.
        opts += [f"--output={self.log_pattern}", "--open-mode=append"]
        if self.signal_seconds:
            opts.append(f"--signal=TERM@{self.signal_seconds}")
        if self.requeue:
            opts.append("--requeue")
        if self.overcommit:
            opts.append("--overcommit")
        return opts + list(self.extra_args)


def render_script(job: SlurmJob) -> str:
    """The sbatch script: options, environment, `srun train.py`, optional self-requeue."""
    workdir, python = shlex.quote(job.train.workdir), shlex.quote(job.train.python)
    lines = [
        "#!/bin/bash",
        "# jaxclip training job written by launch/submit.py. Submitting it again resumes",
        "# from the latest checkpoint in the workdir.",
        *(f"#SBATCH {opt}" for opt in job.directives()),
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(job.repo_dir)}",
        *(f"export {name}={shlex.quote(value)}" for name, value in job.env),
        'echo "jaxclip: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}'
        ' on ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} tasks"',
        # One task failing must stop the others, which would wait in a collective forever.
        f"srun --kill-on-bad-exit=1 {job.train.shell()}",
    ]
    if job.requeue:
        lines += [
            "# Stopped early by SIGTERM (time limit, preemption): queue again to resume.",
            "progress=0",
            f"{python} -m jaxclip.cluster.progress {workdir} || progress=$?",
            'if [ "$progress" -eq 3 ]; then',
            '  echo "jaxclip: run not finished; requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID" || echo "jaxclip: scontrol requeue refused"',
            "fi",
        ]
    return "\n".join(lines) + "\n"


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(
            f"{args[0]} not found: {what} needs the SLURM client tools. Run this on a SLURM "
            f"login node, or pass --dry_run to print the script without submitting."
        )
    return subprocess.run(args, capture_output=True, text=True, check=False)


def submit(script_path: str | Path) -> int:
    """`sbatch --parsable SCRIPT`; returns the job id."""
    result = _run(["sbatch", "--parsable", str(script_path)], "submitting")
    if result.returncode != 0:
        raise SlurmError(
            f"sbatch refused {script_path} (exit {result.returncode}):\n"
            f"{result.stderr.strip() or result.stdout.strip()}\n"
            f"Check the partition/account/time options against `sinfo` and your allocation."
        )
    first = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    try:
        return int(first.split(";")[0])
    except ValueError:
        raise SlurmError(f"sbatch printed no job id: {result.stdout!r}") from None


@dataclasses.dataclass(frozen=True)
class JobStatus:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    exit_code: int  # the job's exit status; 128 + N if killed by signal N
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


def _exit_code(raw: str) -> int:
    """SLURM writes `status:signal`, e.g. `0:0`, `3:0`, `0:15`."""
    status, _, signal = raw.partition(":")
    status_i, signal_i = int(status or 0), int(signal or 0)
    return 128 + signal_i if signal_i else status_i


def job_status(job_id: int) -> JobStatus | None:
    """The job's state from `scontrol` (while the controller remembers it) or `sacct`."""
    result = _run(["scontrol", "show", "job", "-o", str(job_id)], "following a job")
    if result.returncode == 0 and "JobState=" in result.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return JobStatus(
            fields["JobState"],
            _exit_code(fields.get("ExitCode", "0:0")),
            int(fields.get("Restarts", 0)),
        )
    if shutil.which("sacct") is None:
        return None
    acct = subprocess.run(
        ["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode"],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = [r for r in acct.stdout.strip().splitlines() if "|" in r]
    if acct.returncode != 0 or not rows:
        return None
    state, code = rows[-1].split("|")[:2]
    return JobStatus(state.split()[0], _exit_code(code))


def wait(
    job_id: int,
    *,
    poll_seconds: float = 5.0,
    on_change: Callable[[JobStatus], None] | None = None,
) -> JobStatus:
    """Polls until the job reaches a final state; requeued restarts are followed through."""
    last, misses = None, 0
    while True:
        status = job_status(job_id)
        if status is None:
            misses += 1
            if misses >= 3:
                raise SlurmError(
                    f"Job {job_id} is no longer known to scontrol and sacct has no record of "
                    f"it (no accounting database?). Look at its log for the outcome."
                )
        else:
            misses = 0
            if on_change is not None and (last is None or status != last):
                on_change(status)
            last = status
            if status.done:
                if status.state != "COMPLETED" and status.exit_code == 0:
                    return dataclasses.replace(status, exit_code=1)  # e.g. CANCELLED
                return status
        time.sleep(poll_seconds)
