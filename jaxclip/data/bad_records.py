"""Skipping and counting bad records across grain worker processes, exactly resumable.

A record that cannot be used (unreadable shard, broken msgpack, undecodable or oversized
image, no caption) reaches this stage as a marker `{"bad": reason, "where": ...}` instead of
an example. Two stages turn markers into counts:

- `BatchGoodRecords` runs where the records are decoded (in each grain worker process, or
  in the main process without workers). It drops markers, stacks good examples into
  batches, and keeps cumulative counters (records read, bad records, the last bad one). Every
  batch carries a stamp with that worker's counters. The counters are part of the
  iterator state, which grain hands back to each worker on restore.
- `TotalBadRecords` runs in the main process, after the workers. It keeps the latest stamp
  of every worker (counters only grow, so the latest is the maximum) and sums them: the
  totals are exact at every batch, and after a restore too, since the per-worker stamps
  are part of its own state. It logs the first bad records, stops the run when the bad
  fraction passes the limit, and attaches the totals to the batch for the train loop's
  metrics (`pop_metrics`).

Each worker also judges its own counters against the limit: a worker whose records are all
bad would otherwise never finish a batch. Workers read interleaved slices of one shuffled
stream, so each worker's fraction estimates the whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

# Bad records logged one by one (shard, position, reason); later ones are only counted.
WARN_FIRST = 10
# Descriptions a worker forwards with one batch (bounds the stamp's size).
_DESCRIBE_PER_BATCH = WARN_FIRST
_STATS_KEY = "data_stats"
_WORKER_INDEX = 0  # this process's grain worker number; set by `remember_worker`


class BadDataError(RuntimeError):
    """Too large a fraction of the records cannot be used."""


def remember_worker(worker_index: int, worker_count: int) -> None:
    """grain `worker_init_fn`: lets the stamps say which worker made a batch."""
    del worker_count
    global _WORKER_INDEX
    _WORKER_INDEX = worker_index


def bad_marker(reason: str, where: str) -> dict:
    """What a decoding step returns instead of an example it cannot produce."""
    return {"bad": reason, "where": where}


@dataclasses.dataclass(frozen=True)
class BadRecordLimit:
    """Stops a run whose bad fraction exceeds `max_fraction`, judged after `min_records`."""

    max_fraction: float
    min_records: int

    def check(self, seen: int, bad: int, last_bad: str) -> None:
        if seen < max(self.min_records, 1) or bad <= self.max_fraction * seen:
            return
        raise BadDataError(
            f"Too many bad records: {bad} of the {seen} records read so far ({bad / seen:.2%}) "
            f"could not be used, above data.max_bad_fraction={self.max_fraction}. Last bad "
            f"record: {last_bad.rstrip('.')}. Fix the data: reconvert it with "
            f"launch/prepare_data.py (see docs/data.md; it reports what it skipped and why), "
            f"or, if this fraction is expected, raise the limit with "
            f"--config.data.max_bad_fraction=<fraction>."
        )


def _stack(examples: list[dict]) -> dict:
    return {name: np.stack([e[name] for e in examples]) for name in examples[0]}


class BatchGoodRecords(grain.IterDataset):
    """Drops bad-record markers (counting them) and batches the good examples."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, limit: BadRecordLimit):
        super().__init__(parent)
        self.batch_size = batch_size
        self.limit = limit

    def __iter__(self) -> grain.DatasetIterator:
        return _BatchGoodRecordsIterator(self._parent.__iter__(), self.batch_size, self.limit)

    def __str__(self) -> str:
        return f"BatchGoodRecords(batch_size={self.batch_size})"


class _BatchGoodRecordsIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, limit: BadRecordLimit):
        super().__init__(parent)
        self._batch_size = batch_size
        self._limit = limit
        self._seen = 0
        self._bad = 0
        self._last_bad = ""

    def __next__(self) -> dict:
        good, described = [], []
        while len(good) < self._batch_size:
            element = next(self._parent)
            self._seen += 1
            if "bad" not in element:
                good.append(element)
                continue
            self._bad += 1
            self._last_bad = f"{element['where']}: {element['bad']}"
            if len(described) < _DESCRIBE_PER_BATCH:
                described.append(self._last_bad)
            self._limit.check(self._seen, self._bad, self._last_bad)
        batch = _stack(good)
        batch[_STATS_KEY] = {
            "worker": _WORKER_INDEX,
            "seen": self._seen,
            "bad": self._bad,
            "last_bad": self._last_bad,
            "new_bad": described,
        }
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "seen": self._seen,
            "bad": self._bad,
            "last_bad": self._last_bad,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._seen, self._bad = int(state["seen"]), int(state["bad"])
        self._last_bad = state["last_bad"]


class TotalBadRecords(grain.IterDataset):
    """Main process: sums the workers' counters, warns, enforces the limit."""

    def __init__(self, parent: grain.IterDataset, limit: BadRecordLimit, worker_count: int):
        super().__init__(parent)
        self.limit = limit
        self.worker_count = worker_count

    def __iter__(self) -> grain.DatasetIterator:
        return _TotalBadRecordsIterator(self._parent.__iter__(), self.limit, self.worker_count)

    def __str__(self) -> str:
        return f"TotalBadRecords(worker_count={self.worker_count})"


class _TotalBadRecordsIterator(grain.DatasetIterator):
    def __init__(self, parent, limit: BadRecordLimit, worker_count: int):
        super().__init__(parent)
        self._limit = limit
        self._worker_count = worker_count
        self._workers: dict[str, list] = {}  # worker -> [seen, bad, last_bad]
        self._warned = 0

    def __next__(self) -> dict:
        batch = next(self._parent)
        stamp = batch.pop(_STATS_KEY)
        self._workers[str(stamp["worker"])] = [stamp["seen"], stamp["bad"], stamp["last_bad"]]
        for description in stamp["new_bad"]:
            if self._warned < WARN_FIRST:
                self._warned += 1
                more = " (later bad records are only counted)" if self._warned == WARN_FIRST else ""
                logging.warning("Skipping bad record %s%s", description, more)
        seen = sum(w[0] for w in self._workers.values())
        bad = sum(w[1] for w in self._workers.values())
        self._limit.check(seen, bad, stamp["last_bad"] or self._any_last_bad())
        batch[_STATS_KEY] = {"seen_records": seen, "bad_records": bad}
        return batch

    def _any_last_bad(self) -> str:
        return next((w[2] for w in self._workers.values() if w[2]), "")

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "worker_count": self._worker_count,
            "workers": {k: list(v) for k, v in self._workers.items()},
            "warned": self._warned,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state["worker_count"] != self._worker_count:
            raise ValueError(
                f"The saved data-iterator position was made with data.worker_count="
                f"{state['worker_count']}; this run has {self._worker_count}. Each worker reads "
                f"its own slice of the stream, so the position only resumes with the same count: "
                f"set --config.data.worker_count={state['worker_count']}."
            )
        self._parent.set_state(state["parent"])
        self._workers = {k: list(v) for k, v in state["workers"].items()}
        self._warned = int(state["warned"])


def pop_metrics(batch: dict) -> dict[str, float]:
    """Removes the loader's counters from a batch; {} for loaders without them (shapes)."""
    stats = batch.pop(_STATS_KEY, None)
    if stats is None:
        return {}
    seen, bad = stats["seen_records"], stats["bad_records"]
    return {
        "data/seen_records": float(seen),
        "data/bad_records": float(bad),
        "data/bad_fraction": bad / seen if seen else 0.0,
    }
