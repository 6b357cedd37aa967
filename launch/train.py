"""Train a CLIP-family model from a named config.

    python launch/train.py --config demo [--workdir DIR] [--config.key=value ...]
    python launch/train.py --config vit_b16_clip --dry_run
    python launch/train.py --config vit_b16_lift --aot v5p-64 [--aot_search]  # fits? (no TPU)

Resumes automatically from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxclip import sigterm  # noqa: E402

# Before JAX or grain start any thread or process: from here a SIGTERM (preemption) is
# recorded, and training stops at a step all processes agree on (jaxclip/sigterm.py).
sigterm.hold()

import _cli  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("config", "demo", "Name of a config in configs/ (or a path to a .py file).")
flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics and logs go here (default workdirs/NAME)."
)
flags.DEFINE_bool("dry_run", False, "Build the model abstractly, print sizes and exit.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string(
    "aot",
    None,
    "Ahead-of-time fit check: compile the train step for TARGET (v5p-64, v5e-16, v4-8, "
    "8xH100, ...) without its hardware; print per-device memory, fit and FLOPs, then exit.",
)
flags.DEFINE_bool("aot_search", False, "With --aot: find the largest per-device batch that fits.")
flags.DEFINE_bool("aot_flops", True, "With --aot: also count FLOPs (one more, unrolled compile).")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS; SLURM and Cloud "
    "TPU need none of these three flags).",
)
flags.DEFINE_integer("num_processes", None, "Multi-process: how many (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process: this one's index (else $JAX_PROCESS_ID).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    import jax

    from jaxclip import mesh as mesh_lib
    from jaxclip import run_setup
    from jaxclip import train as train_lib
    from jaxclip.checkpoint import CheckpointError
    from jaxclip.config import ConfigError
    from jaxclip.data.bad_records import BadDataError
    from jaxclip.data.embedding_store import StoreError
    from jaxclip.data.records import DatasetError
    from jaxclip.distributed import DistributedError
    from jaxclip.report import dry_run_report

    cfg = _cli.load(FLAGS.config, OVERRIDES)
    if FLAGS.aot or FLAGS.aot_search or FLAGS.dry_run:
        sigterm.release()  # nothing to checkpoint: SIGTERM ends these at once
    if FLAGS.aot or FLAGS.aot_search:  # before anything starts a JAX backend
        from jaxclip import aot

        if not FLAGS.aot:
            sys.exit("error: --aot_search needs --aot TARGET (e.g. --aot v5p-64).")
        try:
            aot.run(cfg, FLAGS.aot, search=FLAGS.aot_search, flops=FLAGS.aot_flops)
        except aot.AotError as e:
            sys.exit(f"error: {e}")
        return
    try:
        mesh_lib.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
    except DistributedError as e:
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process reports
    if FLAGS.dry_run:
        print(dry_run_report(run_setup.build(cfg)))
        return
    workdir = FLAGS.workdir or f"workdirs/{cfg.name}"
    logging.info("Training %s in %s", cfg.name, workdir)
    try:
        results = train_lib.train(cfg, workdir, progress=FLAGS.progress)
    except (
        train_lib.WorkdirError,
        train_lib.NonFiniteError,
        CheckpointError,
        StoreError,
        ConfigError,
        DatasetError,
        BadDataError,
    ) as e:
        sys.exit(f"error: {e}")
    evals = {k: v for k, v in results.items() if k.startswith("eval/") and "chance" not in k}
    if evals and jax.process_index() == 0:
        print("final evaluation:")
        for name, value in sorted(evals.items()):
            print(f"  {name[5:]:<32}{value:.4f}")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    _cli.setup_logging()
    app.run(main, argv=ARGV)
