"""Embed every training caption (and every evaluation text) once, for LIFT training.

    python launch/embed_text.py --config NAME [--store_dir DIR] [--config.key=value ...]

Embeds every usable caption of every record of every dataset the config trains on
(`data.source=shapes`, or `records` with `data.records.paths`, mixtures included), and the
prompts and captions of the configured `eval.tasks`, with the configured frozen encoder.
Writes the store (jaxclip/data/embedding_store.py) to --store_dir, else
text_encoder.store_dir, else workdirs/embeddings/NAME. Rerunning resumes: finished shards
are kept. With several processes (SLURM / jax.distributed) each embeds its share of the
shards on its own devices; process 0 writes the manifests once all shards exist.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("config", "demo", "Name of a config in configs/ (or a path to a .py file).")
flags.DEFINE_string("store_dir", None, "Where to write the store (default: from the config).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    import jax

    from jaxclip import caption_embeddings
    from jaxclip import config as config_lib
    from jaxclip import mesh as mesh_lib
    from jaxclip.config import ConfigError
    from jaxclip.data import embedding_store as es
    from jaxclip.data.records import DatasetError

    cfg = _cli.load(FLAGS.config, OVERRIDES)
    if FLAGS.store_dir:
        config_lib.override(cfg, "text_encoder.store_dir", FLAGS.store_dir)
    mesh_lib.initialize_distributed()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process reports
    started = time.perf_counter()
    try:
        store_dir = caption_embeddings.build(cfg, progress=FLAGS.progress)
    except (es.StoreError, ConfigError, DatasetError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        elapsed = time.perf_counter() - started
        print(f"embedding store: {store_dir} ({elapsed:.1f} s)")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    _cli.setup_logging()
    app.run(main, argv=ARGV)
