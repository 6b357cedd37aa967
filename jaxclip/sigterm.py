"""SIGTERM recorded, not fatal: schedulers send it before preemption or a time limit.

SLURM (through slurmstepd) signals every process of a job step: the trainer and each of its
grain data workers. A worker that dies of the signal breaks the next batch before the
trainer reaches the step where every process agreed to save. So `hold()` blocks SIGTERM in
the calling thread instead of ignoring it:

- A blocked signal is never lost: it stays pending until a thread takes it.
- The blocked mask is inherited by every thread and child process created afterwards (it
  survives fork and exec, unlike a handler), so data workers never see SIGTERM and their
  parent stops them itself.
- The stdlib's resource tracker unblocks SIGTERM when it starts, so it is started first.
- A watcher thread takes the pending signal with `sigtimedwait` and records it. A thread
  created before `hold()` may still receive it directly: the Python handler installed here
  records that too, so the signal is never the default "terminate".

Call `hold()` as early as possible, before anything starts threads or processes
(launch/train.py does it before importing JAX). This module imports nothing heavy.
On platforms without `sigtimedwait` (macOS), only the handler is installed.
"""

from __future__ import annotations

import signal
import threading
from multiprocessing import resource_tracker

_requested = threading.Event()
_lock = threading.Lock()
_state: dict | None = None  # what hold() changed, for release()
_POLL_SECONDS = 0.2


def _on_signal(signum, frame) -> None:
    del signum, frame
    _requested.set()


def _watch(stop: threading.Event) -> None:
    while not stop.is_set():
        if signal.sigtimedwait({signal.SIGTERM}, _POLL_SECONDS) is not None:
            _requested.set()


def hold() -> bool:
    """From now on SIGTERM is recorded (see `requested()`) and not delivered to threads and
    processes started later by this thread. Must be called from the main thread; returns
    False (and changes nothing) elsewhere. Safe to call twice."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        if _state is not None:
            return True
        previous_handler = signal.signal(signal.SIGTERM, _on_signal)
        state = {"handler": previous_handler, "blocked": False, "watcher": None}
        if hasattr(signal, "sigtimedwait"):
            # The stdlib's resource tracker, which multiprocessing starts for the first spawned
            # process (grain's workers), unblocks SIGTERM in the thread that starts it. Start
            # it now, before blocking: later spawns then leave the mask alone.
            resource_tracker.ensure_running()
            previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            state["blocked"] = signal.SIGTERM not in previous_mask
            stop = threading.Event()
            watcher = threading.Thread(
                target=_watch, args=(stop,), name="sigterm-watcher", daemon=True
            )
            watcher.start()
            state["watcher"], state["stop"] = watcher, stop
        _state = state
        return True


def requested() -> bool:
    """Whether a SIGTERM arrived since `hold()` (or the last `reset()`)."""
    return _requested.is_set()


def release() -> None:
    """Undoes `hold()` in this thread: the previous handler and signal mask come back.
    A SIGTERM recorded so far stays recorded."""
    global _state
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if _state is None:
            return
        state, _state = _state, None
        if state["watcher"] is not None:
            state["stop"].set()
            state["watcher"].join()
        if state["blocked"]:
            # Take a signal that is still pending first: it belongs to this run.
            if signal.sigtimedwait({signal.SIGTERM}, 0) is not None:
                _requested.set()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        previous = state["handler"]
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def reset() -> None:
    """Forgets a recorded SIGTERM (a new run in the same process starts clean)."""
    _requested.clear()
