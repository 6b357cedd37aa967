"""jaxclip.sigterm in a child process of its own: a SIGTERM to the whole process group (as
slurmstepd sends it) is recorded, also when it arrives before anything reads it, and the
threads and processes started after `hold()` never die of it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import multiprocessing, sys, threading, time
    from jaxclip import sigterm

    if __name__ == "__main__":
        if sys.argv[1] == "hold":
            sigterm.hold()
        # A thread and a process started afterwards, like XLA's threads and grain's workers
        # (multiprocessing "spawn", which also starts the stdlib's resource tracker).
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
        worker.start()
        print(worker.pid, flush=True)
        sys.stdin.readline()  # the test signals the process group, then writes a line
        time.sleep(0.5)  # the watcher polls every 0.2 s
        print("requested" if sigterm.requested() else "not requested", flush=True)
        print("worker alive" if worker.is_alive() else "worker dead", flush=True)
        worker.kill()
        sigterm.release()
        print("released", flush=True)
        sys.stdin.readline()  # a SIGTERM now takes the default action: this never returns
    """
)


def start(mode: str) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a SLURM step
    )
    return child, int(child.stdout.readline())


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its (orphaned) parent's reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


@pytest.mark.skipif(not hasattr(signal, "sigtimedwait"), reason="no sigtimedwait (macOS)")
def test_a_held_sigterm_is_recorded_and_spares_later_threads_and_processes():
    child, worker = start("hold")
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "requested"
        assert child.stdout.readline().strip() == "worker alive"
        assert child.stdout.readline().strip() == "released"
        # Released: SIGTERM is fatal again.
        os.kill(child.pid, signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop(child)


def test_without_hold_the_same_sigterm_kills_both():
    """The control: what happens to a trainer and its data workers without `hold()`."""
    child, worker = start("none")
    try:
        os.killpg(child.pid, signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while not dead(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead(worker)
    finally:
        stop(child)
