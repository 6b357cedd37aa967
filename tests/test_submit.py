"""launch/submit.py and jaxclip.cluster: slice arithmetic, sbatch scripts, TPU VM command
lines and GKE JobSets, checked by parsing what is generated (bash -n, shlex, YAML)."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxclip.cluster import gke, progress, slices, slurm, tpu_vm
from jaxclip.cluster.command import SubmitError, TrainCommand, job_name, parse_env

ROOT = Path(__file__).resolve().parent.parent


def submit(*args, cwd=ROOT):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "launch/submit.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --- TPU slice table ------------------------------------------------------------------------

# name -> (chips, topology, hosts, chips per host, GKE accelerator label); from Cloud TPU docs.
KNOWN_SLICES = {
    "v5p-64": (32, "2x4x4", 8, 4, "tpu-v5p-slice"),
    "v5p-8": (4, "2x2x1", 1, 4, "tpu-v5p-slice"),
    "v5litepod-16": (16, "4x4", 4, 4, "tpu-v5-lite-podslice"),
    "v5e-16": (16, "4x4", 4, 4, "tpu-v5-lite-podslice"),
    "v5litepod-8": (8, "2x4", 1, 8, "tpu-v5-lite-podslice"),
    "v4-8": (4, "2x2x1", 1, 4, "tpu-v4-podslice"),
    "v4-128": (64, "4x4x4", 16, 4, "tpu-v4-podslice"),
    "v6e-256": (256, "16x16", 64, 4, "tpu-v6e-slice"),
}


@pytest.mark.parametrize("name", sorted(KNOWN_SLICES))
def test_slice_table_gives_chips_topology_and_hosts(name):
    chips, topology, hosts, per_host, label = KNOWN_SLICES[name]
    tpu = slices.tpu_slice(name)
    assert (tpu.chips, tpu.topology, tpu.hosts, tpu.chips_per_host) == (
        chips,
        topology,
        hosts,
        per_host,
    )
    assert tpu.generation.gke_accelerator == label
    # Consistency that does not depend on the table: the torus holds every chip once.
    assert math.prod(int(d) for d in tpu.topology.split("x")) == tpu.chips
    assert tpu.hosts * tpu.chips_per_host == tpu.chips
    assert slices.tpu_slice(tpu.accelerator_type) == tpu  # the Cloud name round-trips


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5p-63", "counts TensorCores (2 per chip)"),
        ("v5p-12", "Standard sizes: v5p-8, v5p-16"),
        ("v5litepod-12", "counts chips"),
        ("v9-8", "Unknown TPU generation 'v9'"),
        ("8xH100", "not a TPU accelerator type"),
    ],
)
def test_unknown_slices_are_refused_with_the_valid_names(name, message):
    with pytest.raises(slices.SliceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slices.tpu_slice(name)


def test_gpu_types_map_to_gke_labels():
    assert slices.gke_gpu_label("H100") == "nvidia-h100-80gb"
    assert slices.gke_gpu_label("nvidia-l4") == "nvidia-l4"
    with pytest.raises(slices.SliceError, match="nvidia-h100-80gb"):
        slices.gke_gpu_label("h1000")


# --- SLURM script ---------------------------------------------------------------------------


def make_job(**kwargs):
    train = TrainCommand("demo", "/shared/run 1", (("train.steps", "10"),), "/venv/bin/python")
    values = dict(name="jaxclip-demo", train=train, repo_dir="/repo", log_dir="/shared/logs")
    values.update(kwargs)
    return slurm.SlurmJob(**values)


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_sbatch_script_is_valid_bash_and_srun_runs_train_py(tmp_path):
    job = make_job(ntasks=2, time="01:00:00", partition="cpu", env=(("A", "x y"),))
    script = slurm.render_script(job)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    opts = sbatch_options(script)
    assert "--ntasks=2" in opts and "--nodes=1" in opts and "--time=01:00:00" in opts
    assert "--partition=cpu" in opts and "--signal=TERM@120" in opts
    assert "--output=/shared/logs/%x-%j.out" in opts
    assert not any(o.startswith("--ntasks-per-node") for o in opts)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)
    assert argv[: argv.index("/venv/bin/python")] == ["srun", "--kill-on-bad-exit=1"]
    assert argv[argv.index("/venv/bin/python") :] == job.train.argv()
    assert job.train.argv()[-4:] == [
        "--workdir",
        "/shared/run 1",
        "--progress=false",
        "--config.train.steps=10",
    ]
    assert "export A='x y'" in script and "scontrol requeue" not in script


def test_gpu_nodes_run_one_task_per_gpu():
    opts = sbatch_options(slurm.render_script(make_job(nodes=4, gpus_per_node=8)))
    assert "--nodes=4" in opts and "--ntasks-per-node=8" in opts and "--gpus-per-node=8" in opts
    with pytest.raises(SubmitError, match="one process per GPU"):
        make_job(gpus_per_node=8, ntasks_per_node=1)


def test_requeue_script_requeues_only_an_unfinished_run(tmp_path):
    """Runs the script's tail with stand-ins for srun and scontrol on PATH."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"steps": 10}}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
        (bin_dir / tool).chmod(0o755)
    train = TrainCommand("demo", str(workdir), (), sys.executable)
    job = make_job(train=train, repo_dir=str(ROOT), requeue=True)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_script(job))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77")

    def calls():
        subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
        return (tmp_path / "calls").read_text().splitlines()

    assert "--requeue" in sbatch_options(script.read_text())
    assert calls()[-1] == "scontrol requeue 77"  # step 4 of 10
    (tmp_path / "calls").unlink()
    (workdir / "checkpoints" / "10").mkdir()
    assert calls()[-1].startswith("srun ")  # finished: no requeue


def test_exit_codes_follow_slurm_status_and_signal():
    assert slurm._exit_code("0:0") == 0
    assert slurm._exit_code("3:0") == 3
    assert slurm._exit_code("0:15") == 128 + 15


def test_progress_counts_only_complete_checkpoints(tmp_path):
    assert progress.main(["progress", str(tmp_path)]) == 2  # no run here
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 8}}))
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-123").mkdir()
    assert progress.latest_complete_step(tmp_path) == 4
    assert progress.main(["progress", str(tmp_path)]) == progress.NOT_FINISHED
    (tmp_path / "checkpoints" / "8").mkdir()
    assert progress.main(["progress", str(tmp_path)]) == 0


def test_env_and_job_names():
    assert parse_env(["A=1", "XLA_FLAGS=--a=b"]) == (("A", "1"), ("XLA_FLAGS", "--a=b"))
    with pytest.raises(SubmitError, match="NAME=VALUE"):
        parse_env(["no-equals"])
    assert job_name("vit_b16_lift", None) == "jaxclip-vit-b16-lift"
    with pytest.raises(SubmitError, match="letters, digits"):
        make_job(name="my job")
    with pytest.raises(SubmitError, match="without spaces"):
        make_job(log_dir="/shared/run 1/slurm")


# --- TPU VM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v5p-64", "v5litepod-16", "v4-8"])
def test_tpu_vm_commands_target_every_worker_of_the_slice(name):
    tpu = slices.tpu_slice(name)
    vm = tpu_vm.TpuVm("my-slice", "us-east5-a", "proj")
    train = TrainCommand("vit_b16_lift", "/mnt/runs/a b", (("data.batch_size", "4096"),))
    argv = vm.ssh(tpu_vm.train_remote_command(vm, train, (("A", "1 2"),)))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-slice"]
    assert "--zone=us-east5-a" in argv and "--project=proj" in argv and "--worker=all" in argv
    remote = shlex.split(argv[argv.index("--command") + 1])
    assert remote[:3] == ["cd", "jaxclip", "&&"] and remote[3] == "A=1 2"
    assert remote[4:] == train.argv()
    # The printed line, pasted into a shell, gives gcloud the same arguments.
    assert shlex.split(shlex.join(argv)) == argv
    create = tpu_vm.create_command(vm, tpu)
    assert f"--accelerator-type={tpu.accelerator_type}" in create
    assert f"--version={tpu.generation.runtime_version}" in create


def test_tpu_vm_cli_prints_setup_and_train_commands():
    out = submit(
        *("--cluster", "tpu-vm", "--tpu_name", "s1", "--zone", "z", "--accelerator", "v5p-64"),
        *("--workdir", "/mnt/runs/x", "--config.data.batch_size=512"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# v5p-64: 32 chips (2x4x4), 8 hosts" in out.stdout
    lines = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud")]
    assert [argv[4] for argv in lines] == ["create", "ssh", "ssh"]
    setup, train = (shlex.split(argv[argv.index("--command") + 1]) for argv in lines[1:])
    assert "jax[tpu]==" + __import__("jax").__version__ in setup
    assert train[train.index("launch/train.py") - 1] == ".venv/bin/python"
    assert train[-1] == "--config.data.batch_size=512"


# --- GKE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, slices_count", [("v5p-64", 1), ("v5litepod-16", 2), ("v4-8", 1)])
def test_gke_tpu_jobset_has_one_pod_per_host(name, slices_count):
    tpu = slices.tpu_slice(name)
    train = TrainCommand("vit_b16_clip", "/runs/b16")
    manifest = gke.jobset(
        "clip-b16",
        "img:1",
        train,
        tpu=tpu,
        num_slices=slices_count,
        volume_claim="runs",
        mount_path="/runs",
    )
    doc = yaml.safe_load(gke.to_yaml(manifest))
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    chips = KNOWN_SLICES[name][0]
    assert rjob["replicas"] == slices_count
    assert job["parallelism"] == job["completions"] == tpu.hosts
    assert job["parallelism"] * container["resources"]["limits"]["google.com/tpu"] == chips
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": KNOWN_SLICES[name][4],
        "cloud.google.com/gke-tpu-topology": KNOWN_SLICES[name][1],
    }
    command = container["command"]
    assert command[:2] == ["bash", "-c"]
    (line,) = [line for line in command[2].splitlines() if "launch/train.py" in line]
    assert shlex.split(line) == [*train.argv(), "&"]
    assert {"name": "workdir", "mountPath": "/runs"} in container["volumeMounts"]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_gke_gpu_jobset_tells_each_pod_its_process_id():
    train = TrainCommand("vit_b16_clip", "/runs/b16")
    manifest = gke.jobset(
        "clip-h100", "img:1", train, gpu_label="nvidia-h100-80gb", gpus_per_node=8, nodes=2
    )
    doc = yaml.safe_load(gke.to_yaml(manifest))
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert rjob["replicas"] == 1 and job["parallelism"] == job["completions"] == 2
    assert job["completionMode"] == "Indexed"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    env = {e["name"]: e for e in container["env"]}
    # Pod 0 of job 0 in the JobSet's headless service (named after the JobSet).
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "clip-h100-workers-0-0.clip-h100:62000"
    assert env["JAX_NUM_PROCESSES"]["value"] == "2"
    field = env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "job-completion-index" in field
    assert doc["spec"]["network"]["enableDNSHostnames"] is True


def fake_trainer(tmp_path: Path, exit_code: int | None, save_seconds: float = 0) -> str:
    """A stand-in `python`: `-m ...` goes to the real one; "train.py" sleeps until SIGTERM
    (exit_code None), then takes `save_seconds` to "checkpoint" and exits 0."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = -m ]; then exec {sys.executable} "$@"; fi\n'
        f"trap 'sleep {save_seconds}; echo term > {tmp_path}/got_term; exit 0' TERM\n"
        f"touch {tmp_path}/started\n"
        f"sleep {60 if exit_code is None else 0} & wait $!\n"
        f"exit {exit_code or 0}\n"
    )
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("sigterm", progress.NOT_FINISHED),
        ("sigterm_slow_save", progress.NOT_FINISHED),
        ("finished", 0),
        ("crashed", 7),
    ],
)
def test_gke_entrypoint_passes_sigterm_on_and_fails_an_unfinished_run(tmp_path, case, expected):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
    if case == "finished":
        (workdir / "checkpoints" / "4").mkdir()
    exit_code = {"finished": 0, "crashed": 7}.get(case)
    python = fake_trainer(tmp_path, exit_code, 1.0 if case == "sigterm_slow_save" else 0)
    command = gke.entrypoint(TrainCommand("demo", str(workdir), (), python))
    pod = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if case.startswith("sigterm"):  # what Kubernetes sends to PID 1 before it kills the pod
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pod.send_signal(signal.SIGTERM)
    assert pod.wait(timeout=60) == expected, pod.stdout.read()
    assert (tmp_path / "got_term").exists() == case.startswith("sigterm")


def test_gke_refuses_a_workdir_outside_the_shared_volume():
    with pytest.raises(SubmitError, match="not under the shared volume"):
        gke.jobset(
            "x",
            "img",
            TrainCommand("demo", "/tmp/run"),
            tpu=slices.tpu_slice("v4-8"),
            volume_claim="c",
            mount_path="/runs",
        )
    with pytest.raises(SubmitError, match="lowercase"):
        gke.check_name("Clip_B16")


def test_gke_cli_writes_a_manifest_file(tmp_path):
    out = submit(
        *("--cluster", "gke", "--config", "demo", "--accelerator", "v5p-64", "--image", "i:1"),
        *("--volume", "runs:/runs", "--output", str(tmp_path / "job.yaml")),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    doc = yaml.safe_load((tmp_path / "job.yaml").read_text())
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 8
    script = job["template"]["spec"]["containers"][0]["command"][2]
    assert "--workdir /runs/demo --progress=false &" in script
    assert "kubectl apply -f" in out.stdout


# --- CLI errors and dry run -----------------------------------------------------------------


def test_slurm_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    out = submit(
        *("--cluster", "slurm", "--ntasks", "2", "--dry_run", "--workdir", str(tmp_path / "w")),
        "--config.train.steps=7",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#SBATCH --ntasks=2" in out.stdout and "--config.train.steps=7" in out.stdout
    assert not (tmp_path / "w").exists()


def test_a_config_typo_fails_before_anything_is_submitted():
    out = submit("--cluster", "slurm", "--dry_run", "--config.train.stepz=7")
    assert out.returncode != 0
    assert "Unknown config key 'train.stepz'" in out.stderr and "train.steps" in out.stderr
