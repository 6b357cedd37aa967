"""Evaluate a saved checkpoint: prints a table and writes eval_step_N.json to the workdir.

    python launch/eval.py --workdir workdirs/demo [--step N] [--config.eval.num_examples=1024]
    python launch/eval.py --workdir workdirs/vit_b16 --config.eval.data_dir=/data/tfds \\
        --config.eval.tasks="('zeroshot:imagenet2012', 'retrieval:coco_captions')"

The run's own config is read from the checkpoint; the mesh spans the devices present here.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
flags.DEFINE_integer("step", None, "Step to evaluate (default: the latest).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from jaxclip import config as config_lib
    from jaxclip.checkpoint import CheckpointError
    from jaxclip.data.embedding_store import StoreError
    from jaxclip.distributed import DistributedError, initialize, is_primary
    from jaxclip.evaluate import run

    try:
        initialize()  # under srun / on a TPU slice every process evaluates its share
        cfg, step = run.saved_config(FLAGS.workdir, FLAGS.step)
        # Evaluate on whatever devices are here, whatever mesh training used.
        config_lib.apply_overrides(
            cfg, [("mesh.shape.data", "-1"), ("mesh.shape.fsdp", "1"), ("mesh.shape.tensor", "1")]
        )
        config_lib.apply_overrides(cfg, OVERRIDES)
        results = run.evaluate_checkpoint(cfg, FLAGS.workdir, step)
    except (CheckpointError, StoreError, config_lib.ConfigError, DistributedError) as e:
        sys.exit(f"error: {e}")
    if not is_primary():
        return
    print(f"{cfg.name} step {step}")
    print(run.format_table({k: v for k, v in results.items()}))
    print(f"wrote {run.write_results(FLAGS.workdir, step, results)}")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=ARGV)
