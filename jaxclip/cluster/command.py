"""The training command every cluster target runs, once per process.

SLURM's `srun`, a TPU VM's `--worker=all` ssh and a GKE pod all start the same
`launch/train.py` in every process; JAX's multi-controller runtime then finds its peers from
the environment (see `jaxclip.distributed`). Only where and how the command starts differs.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence


class SubmitError(ValueError):
    """Cluster options that cannot make a working job, with what to change."""


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """`python launch/train.py --config NAME --workdir DIR [--config.k=v ...]`."""

    config: str
    workdir: str
    overrides: tuple[tuple[str, str], ...] = ()
    python: str = "python"

    def argv(self) -> list[str]:
        args = [self.python, "launch/train.py", "--config", self.config]
        args += ["--workdir", self.workdir]
        # A progress bar redrawn in a log file is noise; metrics.jsonl has every logged step.
        args.append("--progress=false")
        args += [f"--config.{key}={value}" for key, value in self.overrides]
        return args

    def shell(self) -> str:
        return shlex.join(self.argv())


def parse_env(assignments: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`["K=V", ...]` -> `(("K", "V"), ...)`, refusing anything that is not NAME=VALUE."""
    pairs = []
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SubmitError(
                f"--env {item!r} is not NAME=VALUE; e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/x"
            )
        pairs.append((name, value))
    return tuple(pairs)


def job_name(config: str, name: str | None) -> str:
    """The given job name, or `jaxclip-<config>` in the form DNS and SLURM both accept."""
    if name:
        return name
    stem = config.rsplit("/", 1)[-1].removesuffix(".py")
    return "jaxclip-" + stem.lower().replace("_", "-").replace(".", "-")
