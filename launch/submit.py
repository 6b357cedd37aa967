"""Submit training to a cluster: SLURM, Cloud TPU VMs or GKE. Every process runs train.py.

    python launch/submit.py --cluster slurm --config vit_b16_clip --nodes 4 --gpus_per_node 8 \
        --time 24:00:00 --partition gpu --requeue --workdir /shared/runs/b16 [--wait]
    python launch/submit.py --cluster tpu-vm --config vit_b16_lift --tpu_name my-v5p \
        --zone us-east5-a --accelerator v5p-64 --workdir /mnt/runs/b16 [--execute]
    python launch/submit.py --cluster gke --config vit_b16_clip --accelerator v5p-64 \
        --image REGISTRY/jaxclip:TAG --volume runs-pvc:/runs --workdir /runs/b16

`--config.key=value` overrides are checked here, then passed to every train.py. `--dry_run`
prints what would be submitted. The workdir must be storage that every host sees: all
processes write one checkpoint together, and a resubmitted job resumes from it. See
docs/clusters.md.
"""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxclip.cluster import gke, slices, slurm, tpu_vm  # noqa: E402
from jaxclip.cluster.command import SubmitError, TrainCommand, job_name, parse_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

flags.DEFINE_enum("cluster", None, ["slurm", "tpu-vm", "gke"], "Where to run.", required=True)
flags.DEFINE_string("config", "demo", "Name of a config in configs/ (or a .py path in the repo).")
flags.DEFINE_string("workdir", None, "Run directory on shared storage (default workdirs/NAME).")
flags.DEFINE_bool("dry_run", False, "Print what would be submitted; submit nothing.")
flags.DEFINE_string("job_name", None, "Job name (default jaxclip-CONFIG).")
flags.DEFINE_multi_string("env", [], "NAME=VALUE set for every process; repeatable.")
flags.DEFINE_integer(
    "signal", 120, "Seconds of SIGTERM warning before the time limit / kill (checkpoint time)."
)
flags.DEFINE_string("python", None, "Python that runs train.py (default: per cluster).")
# SLURM
flags.DEFINE_integer("nodes", 1, "Nodes (SLURM, GKE GPU pools).")
flags.DEFINE_integer("ntasks", None, "SLURM: total tasks = processes.")
flags.DEFINE_integer("ntasks_per_node", None, "SLURM: tasks per node (default: GPUs or 1).")
flags.DEFINE_integer("gpus_per_node", 0, "GPUs per node (SLURM, GKE).")
flags.DEFINE_integer("cpus_per_task", None, "SLURM: CPUs per task.")
flags.DEFINE_string("time", None, "SLURM time limit, e.g. 04:00:00.")
flags.DEFINE_string("partition", None, "SLURM partition.")
flags.DEFINE_string("account", None, "SLURM account.")
flags.DEFINE_bool("requeue", False, "SLURM: requeue after preemption or time limit; resumes.")
flags.DEFINE_bool("overcommit", False, "SLURM: allow more tasks than CPUs (CPU test clusters).")
flags.DEFINE_multi_string("sbatch_arg", [], "SLURM: extra #SBATCH option, e.g. --qos=high.")
flags.DEFINE_bool("wait", False, "SLURM: follow the job to its end; exit with its status.")
flags.DEFINE_float("poll_seconds", 10.0, "SLURM: --wait polling interval.")
# Cloud TPU
flags.DEFINE_string("accelerator", None, "TPU slice type, e.g. v5p-64, v5litepod-16, v4-8.")
flags.DEFINE_string("tpu_name", None, "TPU VM: the slice's name.")
flags.DEFINE_string("zone", None, "TPU VM: zone, e.g. us-east5-a.")
flags.DEFINE_string("project", None, "TPU VM: Google Cloud project (default: gcloud's).")
flags.DEFINE_string("remote_dir", None, "The checkout on the TPU hosts / in the image.")
flags.DEFINE_bool("execute", False, "TPU VM: run the training command instead of printing it.")
flags.DEFINE_bool("spot", False, "TPU VM: print the create command for a Spot slice.")
# GKE
flags.DEFINE_string("image", None, "GKE: container image holding the jaxclip checkout.")
flags.DEFINE_string("gpu_type", None, f"GKE GPU pool: {', '.join(slices.GKE_GPU_TYPES)}.")
flags.DEFINE_integer("num_slices", 1, "GKE TPU: slices (multislice over the data axis).")
flags.DEFINE_string("volume", None, "GKE: shared workdir volume as PVC_NAME:/mount/path.")
flags.DEFINE_integer("max_restarts", 3, "GKE: JobSet restarts (each one resumes).")
flags.DEFINE_string("output", None, "GKE: manifest file (default NAME-jobset.yaml).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = _cli.load(FLAGS.config, OVERRIDES)  # a typo fails here, not after hours in a queue
    name = job_name(FLAGS.config, FLAGS.job_name)
    try:
        env = parse_env(FLAGS.env)
        if FLAGS.cluster == "slurm":
            sys.exit(submit_slurm(cfg.name, name, env))
        if FLAGS.cluster == "tpu-vm":
            sys.exit(submit_tpu_vm(cfg.name, name, env))
        write_gke(cfg.name, name, env)
    except (SubmitError, slurm.SlurmError, slices.SliceError) as e:
        sys.exit(f"error: {e}")


def submit_slurm(config_name: str, name: str, env) -> int:
    workdir = Path(FLAGS.workdir or REPO / "workdirs" / config_name).absolute()
    config = FLAGS.config  # a config file given by path must be found from the repo too
    config = str(Path(config).absolute()) if config.endswith(".py") else config
    train = TrainCommand(config, str(workdir), tuple(OVERRIDES), FLAGS.python or sys.executable)
    job = slurm.SlurmJob(
        name=name,
        train=train,
        repo_dir=str(REPO),
        log_dir=str(workdir / "slurm"),
        nodes=FLAGS.nodes,
        ntasks=FLAGS.ntasks,
        ntasks_per_node=FLAGS.ntasks_per_node,
        gpus_per_node=FLAGS.gpus_per_node,
        cpus_per_task=FLAGS.cpus_per_task,
        time=FLAGS.time,
        partition=FLAGS.partition,
        account=FLAGS.account,
        env=env,
        requeue=FLAGS.requeue,
        signal_seconds=FLAGS.signal,
        overcommit=FLAGS.overcommit,
        extra_args=tuple(FLAGS.sbatch_arg),
    )
    script = slurm.render_script(job)
    script_path = workdir / "slurm" / f"{name}.sbatch"
    if FLAGS.dry_run:
        print(f"# would write {script_path} and run: sbatch --parsable {script_path}")
        print(script, end="")
        return 0
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    job_id = slurm.submit(script_path)
    print(f"wrote {script_path}")
    print(f"submitted job {job_id} ({name})")
    print(f"log: {job.log_path(job_id)}")
    if not FLAGS.wait:
        print(f"follow: squeue -j {job_id}    cancel: scancel {job_id}")
        return 0

    def report(status: slurm.JobStatus) -> None:
        restarts = f", restart {status.restarts}" if status.restarts else ""
        print(f"job {job_id}: {status.state}{restarts}", flush=True)

    status = slurm.wait(job_id, poll_seconds=FLAGS.poll_seconds, on_change=report)
    print(f"job {job_id} ended {status.state} with exit code {status.exit_code}")
    if status.exit_code:
        _print_log_tail(Path(job.log_path(job_id)))
    return status.exit_code


def _print_log_tail(log: Path, lines: int = 30) -> None:
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {log} ---", *tail, sep="\n")


def submit_tpu_vm(config_name: str, name: str, env) -> int:
    del name
    if not FLAGS.tpu_name or not FLAGS.zone:
        raise SubmitError("--cluster tpu-vm needs --tpu_name and --zone of an existing slice.")
    vm = tpu_vm.TpuVm(FLAGS.tpu_name, FLAGS.zone, FLAGS.project, FLAGS.remote_dir or "jaxclip")
    workdir = FLAGS.workdir or f"workdirs/{config_name}"
    train = TrainCommand(
        FLAGS.config, workdir, tuple(OVERRIDES), FLAGS.python or ".venv/bin/python"
    )
    run = vm.ssh(tpu_vm.train_remote_command(vm, train, env))
    if FLAGS.accelerator:
        tpu = slices.tpu_slice(FLAGS.accelerator)
        print(f"# {tpu.accelerator_type}: {tpu.chips} chips ({tpu.topology}), {tpu.hosts} hosts")
        print("# create the slice:")
        print(shlex.join(tpu_vm.create_command(vm, tpu, spot=FLAGS.spot)))
    print(f"# once, after copying the checkout to ~/{vm.remote_dir} on every host:")
    print(shlex.join(vm.ssh(tpu_vm.setup_remote_command(vm, importlib.metadata.version("jax")))))
    if not FLAGS.workdir:
        print("# a multi-host slice needs --workdir on storage all hosts share (NFS, gcsfuse)")
    print("# train (every host runs the same command; resumes from the workdir):")
    print(shlex.join(run))
    if not FLAGS.execute or FLAGS.dry_run:
        return 0
    return subprocess.run(run, check=False).returncode


def write_gke(config_name: str, name: str, env) -> None:
    mount = claim = None
    if FLAGS.volume:
        claim, sep, mount = FLAGS.volume.partition(":")
        if not (sep and claim and mount.startswith("/")):
            raise SubmitError(f"--volume={FLAGS.volume!r} must be PVC_NAME:/mount/path.")
    default_workdir = f"{mount.rstrip('/')}/{config_name}" if mount else f"workdirs/{config_name}"
    if not FLAGS.image:
        raise SubmitError("--cluster gke needs --image (a container image with jaxclip in it).")
    tpu = slices.tpu_slice(FLAGS.accelerator) if FLAGS.accelerator else None
    if tpu is not None and FLAGS["nodes"].present:
        raise SubmitError(
            f"--nodes does not apply to a TPU slice: {tpu.accelerator_type} has {tpu.hosts} "
            f"hosts, one pod each. Use --num_slices for several slices."
        )
    train = TrainCommand(
        FLAGS.config, FLAGS.workdir or default_workdir, tuple(OVERRIDES), FLAGS.python or "python"
    )
    manifest = gke.jobset(
        name,
        FLAGS.image,
        train,
        remote_dir=FLAGS.remote_dir or "/jaxclip",
        tpu=tpu,
        num_slices=FLAGS.num_slices,
        gpu_label=slices.gke_gpu_label(FLAGS.gpu_type) if FLAGS.gpu_type else None,
        gpus_per_node=FLAGS.gpus_per_node,
        nodes=FLAGS.nodes,
        env=env,
        volume_claim=claim,
        mount_path=mount,
        max_restarts=FLAGS.max_restarts,
        grace_seconds=FLAGS.signal,
    )
    text = gke.to_yaml(manifest)
    if FLAGS.dry_run:
        print(text, end="")
        return
    output = Path(FLAGS.output or f"{name}-jobset.yaml")
    output.write_text(text)
    print(f"wrote {output}")
    if not FLAGS.volume:
        print("# no --volume: the workdir must be storage that every pod shares")
    if tpu is not None:
        total = tpu.hosts * FLAGS.num_slices
        print(
            f"# {FLAGS.num_slices} x {tpu.accelerator_type}: {total} pods of {tpu.chips_per_host}"
        )
    print(f"submit: kubectl apply -f {output}    follow: kubectl get jobset {name}")
    print(f"logs:   kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={name} --max-log-requests=64")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    app.run(main, argv=ARGV)
