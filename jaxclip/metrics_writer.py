"""Metrics to `metrics.jsonl` (machine-readable) and TensorBoard event files, on process 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str | Path):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.active:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **scalars}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tb.close()
