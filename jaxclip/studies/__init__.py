"""Small studies that test the papers' claims on the shapes world (launch/study.py).

    run_study("lift_vs_clip", Path("studies"), quick=False, seed=0)

Each study trains its own variants from scratch under `<out>/<name>/runs/` (nothing is shared
between studies) and writes `<out>/<name>/results.json`, `report.md` and PNG plots.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from jaxclip.config import ConfigError

STUDIES = (
    "lift_vs_clip",
    "positive_pair",
    "caption_quality",
    "text_grounding",
    "zero_shot_vs_probe",
)


class StudyError(ConfigError):
    """An unknown study name."""


def get(name: str):
    if name not in STUDIES:
        raise StudyError(f"Unknown study {name!r}; choose one of: {', '.join(STUDIES)}.")
    return importlib.import_module(f"jaxclip.studies.{name}")


def run_study(name: str, out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Runs study `name` into `out/name/` and returns its results.json content."""
    from jaxclip.studies import common, report

    study = get(name)
    directory = Path(out) / name
    ctx = common.Context(directory, quick=quick, seed=seed, tasks=list(study.TASKS))
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    results = study.run(ctx)
    machine = {**common.machine(), "load_start": round(load_start, 2)}
    return report.write(directory, study, ctx, results, time.perf_counter() - start, machine)
