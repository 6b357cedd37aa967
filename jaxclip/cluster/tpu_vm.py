"""Cloud TPU VMs: the `gcloud` command lines that set up and train on every host of a slice.

A multi-host slice runs one process per host; `gcloud compute tpus tpu-vm ssh --worker=all`
starts the same command on all of them at once, and JAX finds the slice's other hosts from
the TPU metadata. These functions only build argument lists: `launch/submit.py` prints them,
and runs the training one when asked to.
"""

from __future__ import annotations

import dataclasses
import shlex

from jaxclip.cluster.command import TrainCommand
from jaxclip.cluster.slices import TpuSlice


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """A named TPU VM slice and where the jaxclip checkout lives on its hosts."""

    name: str
    zone: str
    project: str | None = None
    # Relative paths start in the ssh user's home directory on every host.
    remote_dir: str = "jaxclip"

    def _target(self) -> list[str]:
        args = [self.name, f"--zone={self.zone}"]
        if self.project:
            args.append(f"--project={self.project}")
        return args

    def ssh(self, remote_command: str, worker: str = "all") -> list[str]:
        """`gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` as argv."""
        return [
            *("gcloud", "compute", "tpus", "tpu-vm", "ssh"),
            *self._target(),
            f"--worker={worker}",
            "--command",
            remote_command,
        ]


def create_command(vm: TpuVm, tpu: TpuSlice, *, spot: bool = False) -> list[str]:
    """`gcloud compute tpus tpu-vm create` for the slice with its generation's runtime."""
    args = [
        *("gcloud", "compute", "tpus", "tpu-vm", "create"),
        *vm._target(),
        f"--accelerator-type={tpu.accelerator_type}",
        f"--version={tpu.generation.runtime_version}",
    ]
    return args + (["--spot"] if spot else [])


def setup_remote_command(vm: TpuVm, jax_version: str) -> str:
    """Creates the virtual environment with JAX's TPU runtime (libtpu) on each host.

    The checkout must already be in `remote_dir` (git clone, or `tpu-vm scp --recurse`).
    """
    return " && ".join(
        [
            f"cd {shlex.quote(vm.remote_dir)}",
            "python3.11 -m venv .venv",
            # Double quotes keep the brackets from the shell, and read well inside --command '…'.
            f'.venv/bin/pip install --quiet -e . "jax[tpu]=={jax_version}"',
        ]
    )


def train_remote_command(
    vm: TpuVm, train: TrainCommand, env: tuple[tuple[str, str], ...] = ()
) -> str:
    """`cd DIR && [NAME=VALUE ...] .venv/bin/python launch/train.py ...` for every host."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in env]
    return f"cd {shlex.quote(vm.remote_dir)} && " + " ".join([*assignments, train.shell()])
