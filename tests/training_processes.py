"""Runs launch/train.py in child processes on localhost: one process, or several joined by
jax.distributed (gloo), for the multi-process and preemption tests.

Children get a config file that calls `tiny_config(**overrides)`, so a child and the test
process train exactly the same config. Every child runs in its own session (its grain
workers too) and is killed by process group if a test fails or times out.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tiny import tiny_config

from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.checkpoint import Checkpointer, abstract_like

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TRAIN = REPO / "launch" / "train.py"
# What launch/train.py logs when a SIGTERM stopped it.
PREEMPTED = re.compile(r"Preempted at step (\d+): checkpoint saved; rerun the same command")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path, name: str, overrides: dict) -> Path:
    """A config file for `--config PATH` that builds `tiny_config(**overrides)`."""
    path = Path(directory) / f"{name}.py"
    path.write_text(
        f"from tiny import tiny_config\n\n\ndef get_config():\n"
        f"    return tiny_config(**{overrides!r})\n"
    )
    return path


@functools.cache
def compilation_cache() -> str:
    """One JAX compilation cache for this test session's children: a rerun (resume) of the
    same config loads its programs instead of compiling them again (about 3x less CPU)."""
    path = tempfile.mkdtemp(prefix="jaxclip-test-compilation-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def child_env(devices_per_process: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    }
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class Training:
    """`num_processes` children of launch/train.py on one workdir; logs under `log_dir`."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        log_dir: Path,
        *,
        num_processes: int = 1,
        devices_per_process: int = 8,
    ):
        self.workdir = Path(workdir)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.logs = [Path(log_dir) / f"process_{i}.log" for i in range(num_processes)]
        command = [sys.executable, str(TRAIN), "--config", str(config)]
        command += ["--workdir", str(workdir), "--noprogress"]
        if num_processes > 1:
            command += ["--coordinator_address", f"127.0.0.1:{free_port()}"]
            command += ["--num_processes", str(num_processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            extra = ["--process_id", str(i)] if num_processes > 1 else []
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(
                        command + extra,
                        cwd=REPO,
                        env=child_env(devices_per_process),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def output(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def kill(self) -> None:
        """SIGKILL every child's process group (the child and its grain workers)."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def wait(self, timeout: float = 300) -> list[int]:
        """Exit codes of all children; on timeout kills them and fails with their logs."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            message = f"training did not finish in {timeout}s:\n{self.all_output()}"
            raise AssertionError(message) from None

    def wait_for(self, condition, timeout: float = 300, poll: float = 0.05) -> None:
        """Polls `condition()` until true; fails if a child exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"condition not reached:\n{self.all_output()}")
            time.sleep(poll)

    def all_output(self) -> str:
        return "\n".join(
            f"--- process {i} ---\n{self.output(i)[-4000:]}" for i in range(len(self.logs))
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def data_workers(pid: int) -> list[int]:
    """The grain worker processes (multiprocessing spawn children) of process `pid`."""
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in cmdline:
            workers.append(int(entry.name))
    return workers


def blocks_sigterm(pid: int) -> bool:
    """Whether SIGTERM is blocked in the main thread of process `pid` (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(blocked & (1 << (signal.SIGTERM - 1)))


def metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_logged_step(workdir: Path) -> int:
    return max((r["step"] for r in metrics(workdir)), default=0)


def train_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(workdir) if "train/loss" in r}


def saved_steps(workdir: Path) -> list[int]:
    checkpointer = Checkpointer(workdir)
    steps = checkpointer.all_steps()
    checkpointer.close()
    return steps


def saved_params(cfg, workdir: Path, step: int | None = None, num_devices: int = 8):
    """The parameters of a saved step, restored in this process onto `num_devices`."""
    setup = run_setup.build(cfg, jax.devices()[:num_devices])
    checkpointer = Checkpointer(workdir)
    step = checkpointer.latest_step() if step is None else step
    state = checkpointer.restore(step, abstract_like(setup.abstract_state, setup.state_shardings))
    checkpointer.close()
    return jax.tree.map(np.asarray, state["params"])


def reference_run(workdir: Path, overrides: dict, num_devices: int = 8):
    """The same config trained uninterrupted in this process, on its first `num_devices`."""
    cfg = tiny_config(**overrides)
    train_lib.train(cfg, workdir, devices=jax.devices()[:num_devices], progress=False)
    return cfg
