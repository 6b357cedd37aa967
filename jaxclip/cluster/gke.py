"""GKE: a JobSet (jobset.x-k8s.io/v1alpha2) that trains on a TPU slice or a GPU node pool.

One pod per host runs `launch/train.py`; the JobSet restarts all of them together when one
fails or is preempted, and the trainer resumes from the latest checkpoint in the shared
workdir. How processes find each other differs:

- TPU: GKE's TPU webhook gives each pod `TPU_WORKER_HOSTNAMES` and `TPU_WORKER_ID`, which
  `jax.distributed` reads by itself. Several slices (`num_slices`) also need the
  `MEGASCALE_*` variables, which GKE sets for multislice JobSets; not tried here.
- GPU: nothing does that, so each pod gets `JAX_COORDINATOR_ADDRESS` (pod 0's stable DNS name
  in the JobSet's headless service), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (the pod's
  completion index), which `jaxclip.distributed` reads. One process per pod sees all its GPUs.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from jaxclip.cluster.command import SubmitError, TrainCommand
from jaxclip.cluster.slices import TpuSlice

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "workers"
COORDINATOR_PORT = 62000
# The annotation Kubernetes puts on each pod of an Indexed Job: 0 .. completions-1.
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def entrypoint(train: TrainCommand) -> list[str]:
    """The container command: train, then fail the pod if the run stopped before its end.

    A preempted pod's trainer saves and exits 0, and a Job whose pods all exit 0 is complete:
    the JobSet would never restart it. So after a clean exit `jaxclip.cluster.progress`
    decides: exit 0 when the last step is saved, else 3, which fails the pod and makes the
    JobSet restart every pod (up to failurePolicy.maxRestarts); they resume from the
    checkpoint. bash is PID 1 here and Kubernetes signals only PID 1, so it hands SIGTERM
    on to the trainer and waits for it to finish saving.
    """
    python, workdir = shlex.quote(train.python), shlex.quote(train.workdir)
    script = "\n".join(
        [
            "signalled=0; child=",
            # Set before the trainer starts. A signal that arrives before `child` is known is
            # remembered and handed on right after.
            'trap \'signalled=1; [ -n "$child" ] && kill -TERM "$child"\' TERM',
            f"{train.shell()} &",
            "child=$!",
            'if [ "$signalled" -eq 1 ]; then kill -TERM "$child"; fi',
            'wait "$child"; status=$?',
            # A trapped signal ends `wait` early (status 143): wait again for the real one.
            'while [ "$signalled" -eq 1 ] && [ "$status" -gt 128 ]; do',
            '  signalled=0; wait "$child"; status=$?',
            "done",
            'if [ "$status" -ne 0 ]; then exit "$status"; fi',
            f"exec {python} -m jaxclip.cluster.progress {workdir}",
        ]
    )
    return ["bash", "-c", script]


def check_name(name: str) -> None:
    # Pod hostnames are NAME-workers-J-P, which must stay a DNS label (63 characters).
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        raise SubmitError(
            f"GKE job name {name!r} must be lowercase letters, digits and '-', start with a "
            f"letter and be at most 40 characters (e.g. --job_name=clip-b16-run1)."
        )


def _container(
    image: str,
    train: TrainCommand,
    remote_dir: str,
    env: list[dict],
    limits: dict[str, int],
    mounts: list[dict],
) -> dict[str, Any]:
    container = {
        "name": "train",
        "image": image,
        "workingDir": remote_dir,
        "command": entrypoint(train),
        "resources": {"limits": limits},
    }
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    return container


def jobset(
    name: str,
    image: str,
    train: TrainCommand,
    *,
    remote_dir: str = "/jaxclip",
    tpu: TpuSlice | None = None,
    num_slices: int = 1,
    gpu_label: str | None = None,
    gpus_per_node: int = 0,
    nodes: int = 1,
    env: tuple[tuple[str, str], ...] = (),
    volume_claim: str | None = None,
    mount_path: str | None = None,
    max_restarts: int = 3,
    grace_seconds: int = 120,
) -> dict[str, Any]:
    """The JobSet as a dict (`to_yaml` writes it). Exactly one of `tpu`, `gpu_label`."""
    check_name(name)
    if (tpu is None) == (gpu_label is None):
        raise SubmitError("A GKE job needs either a TPU slice (--accelerator) or --gpu_type.")
    if tpu is None and gpus_per_node < 1:
        raise SubmitError("--gpu_type needs --gpus_per_node (GPUs per node, e.g. 8).")
    if tpu is not None and num_slices > 1 and tpu.hosts == 1:
        raise SubmitError(
            f"Multislice needs multi-host slices; {tpu.accelerator_type} is a single host."
        )
    if (volume_claim is None) != (mount_path is None):
        raise SubmitError("--volume needs both parts: CLAIM:/mount/path.")
    if mount_path and not train.workdir.startswith(mount_path.rstrip("/") + "/"):
        raise SubmitError(
            f"The workdir {train.workdir} is not under the shared volume {mount_path}: every "
            f"pod must write checkpoints to the same storage. Use --workdir={mount_path}/RUN."
        )

    env_vars = [{"name": k, "value": v} for k, v in env]
    pod: dict[str, Any] = {"restartPolicy": "Never"}
    if tpu is not None:
        hosts, replicas = tpu.hosts, num_slices
        limits = {"google.com/tpu": tpu.chips_per_host}
        pod["nodeSelector"] = {
            "cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
            "cloud.google.com/gke-tpu-topology": tpu.topology,
        }
        # TPU hosts talk over the node network; the TPU runtime expects host networking.
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    else:
        hosts, replicas = nodes, 1
        limits = {"nvidia.com/gpu": gpus_per_node}
        pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": gpu_label}
        coordinator = f"{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}"
        env_vars += [
            {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
            {"name": "JAX_NUM_PROCESSES", "value": str(nodes)},
            {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX}}},
        ]

    volumes, mounts = [], []
    if tpu is None:  # NCCL needs more shared memory than a container's default 64 MB
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if volume_claim:
        volumes.append({"name": "workdir", "persistentVolumeClaim": {"claimName": volume_claim}})
        mounts.append({"name": "workdir", "mountPath": mount_path})
    pod["containers"] = [_container(image, train, remote_dir, env_vars, limits, mounts)]
    if volumes:
        pod["volumes"] = volumes
    # Kubernetes sends SIGTERM, then waits this long before SIGKILL: time to checkpoint.
    pod["terminationGracePeriodSeconds"] = grace_seconds

    job_spec = {
        "parallelism": hosts,
        "completions": hosts,
        "completionMode": "Indexed",
        "backoffLimit": 0,  # one failed pod fails the job; the JobSet restarts everything
        "template": {"spec": pod},
    }
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "jaxclip"}}
    if tpu is not None:
        # Each slice's pods land on one node pool (one physical slice), never split.
        metadata["annotations"] = {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
        }
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {"name": REPLICATED_JOB, "replicas": replicas, "template": {"spec": job_spec}}
            ],
        },
    }


def to_yaml(manifest: dict[str, Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Writes multi-line strings (the entrypoint script) as readable `|` blocks."""

    def represent_str(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return yaml.dump(manifest, Dumper=Dumper, sort_keys=False, default_flow_style=False)
