"""Has the run in a workdir reached its last step? A batch script asks this before requeueing.

    python -m jaxclip.cluster.progress WORKDIR   # exit 0: finished, 3: not yet, 2: no run

Reads only the directory listing and `config.json`, so it starts in a fraction of a second
and imports no JAX. A step directory is complete when its name is the bare step number:
Orbax writes into a temporary name and renames it when the save has finished.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOT_FINISHED = 3


def latest_complete_step(workdir: str | Path) -> int | None:
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, default=None)


def target_steps(workdir: str | Path) -> int:
    """`train.steps` of the run, from the config.json the trainer writes at start."""
    path = Path(workdir) / "config.json"
    try:
        return int(json.loads(path.read_text())["train"]["steps"])
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{path} is missing or unreadable ({e}); no run here?") from e


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    workdir = argv[1]
    try:
        target = target_steps(workdir)
    except FileNotFoundError as e:
        print(f"jaxclip.cluster.progress: {e}", file=sys.stderr)
        return 2
    step = latest_complete_step(workdir)
    print(f"{workdir}: step {step} of {target}")
    return 0 if step is not None and step >= target else NOT_FINISHED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
