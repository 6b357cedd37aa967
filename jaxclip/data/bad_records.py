"""Counting the bad records a training loader met, warning about them, and stopping a run
whose data is too damaged.

A record that cannot be used (unreadable shard, broken msgpack, undecodable or oversized
image, no caption) never reaches a batch: the pipeline replaces it by a stand-in drawn from
the same dataset (`pipeline.TrainExamples`) and marks the example with how many bad
records it passed (`bad`) and the first one's description (`bad_reason`). `BadRecordCounter`
runs in the main process on the batches the train loop takes, so its counts are exact for
the steps trained, however far the data workers have read ahead. Its totals are saved with
each checkpoint (`totals`) and continue after a resume.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

# Bad records logged one by one (shard, position, reason); later ones are only counted.
WARN_FIRST = 10
BAD_FIELDS = ("bad", "bad_reason")


class BadDataError(RuntimeError):
    """Too large a fraction of the records cannot be used."""


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


class BadRecordCounter:
    """Wraps this process's batch iterator: pops the bad-record fields and keeps totals."""

    def __init__(self, batches, limit: BadRecordLimit, totals: dict[str, int] | None = None):
        self._batches = batches
        self.limit = limit
        totals = totals or {}
        self.seen = int(totals.get("seen_records", 0))
        self.bad = int(totals.get("bad_records", 0))
        self._warned = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        bad, reasons = batch.pop("bad"), batch.pop("bad_reason")
        self.seen += int(len(bad) + bad.sum())
        self.bad += int(bad.sum())
        described = [str(r) for r in reasons[np.nonzero(bad)[0]]]
        for reason in described:
            if self._warned < WARN_FIRST:
                self._warned += 1
                more = " (later bad records are only counted)" if self._warned == WARN_FIRST else ""
                logging.warning("Skipping bad record %s%s", reason, more)
        if described:
            self.limit.check(self.seen, self.bad, described[-1])
        return batch

    @property
    def totals(self) -> dict[str, int]:
        return {"seen_records": self.seen, "bad_records": self.bad}

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def metrics(seen: int, bad: int) -> dict[str, float]:
    return {
        "data/seen_records": float(seen),
        "data/bad_records": float(bad),
        "data/bad_fraction": bad / seen if seen else 0.0,
    }
