"""Embed every training caption (and every evaluation text) once, for LIFT training.

    python launch/embed_text.py --config NAME [--store_dir DIR] [--config.key=value ...]
    python launch/embed_text.py --config vit_b16_lift --aot v5p-8     # does the encoder fit?
    python launch/embed_text.py --encoder DIR --texts FILE --output OUT.npy

With --config: embeds every usable caption of every record of every dataset the config
trains on (`data.source=shapes`, or `records` with `data.records.paths`, mixtures
included), and the prompts and captions of the configured `eval.tasks`, with the configured
frozen encoder (`text_encoder.*`). Writes the store (jaxclip/data/embedding_store.py) to
--store_dir, else text_encoder.store_dir, else workdirs/embeddings/NAME. Rerunning resumes:
finished shards are kept. With several processes (SLURM / jax.distributed) each embeds its
share of the shards on its own devices; process 0 writes the manifests once all exist.

With --aot TARGET: compiles the configured encoder's embedding step for a TPU slice or GPU
node without it, at text_encoder.batch_size x text_encoder.max_length, and prints whether it
fits. With --encoder: embeds the lines of a text file with any supported encoder (a Hugging
Face directory) into a float32 .npy, one row per line, for inspection or reuse.
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
flags.DEFINE_string("aot", None, "Compile the embedding step for TARGET (v5p-8, 8xH100, ...).")
flags.DEFINE_string("encoder", None, "A Hugging Face encoder directory (with --texts).")
flags.DEFINE_string("texts", None, "With --encoder: a UTF-8 text file, one text per line.")
flags.DEFINE_string("output", None, "With --encoder: where to write the (lines, dim) .npy.")
flags.DEFINE_integer("max_length", 77, "With --encoder: tokens per text.")
flags.DEFINE_integer("batch_size", 64, "With --encoder: texts per batch.")
flags.DEFINE_string("instruction", "", "With --encoder: a prefix for every text (queries).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "With --encoder: decoder dtype.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def embed_file() -> None:
    """--encoder DIR --texts FILE --output OUT.npy"""
    import numpy as np

    from jaxclip import config as config_lib
    from jaxclip import frozen_encoder

    if not (FLAGS.texts and FLAGS.output):
        sys.exit("error: --encoder needs --texts FILE and --output OUT.npy.")
    texts = Path(FLAGS.texts).read_text(encoding="utf-8").splitlines()
    te = config_lib.base_config().text_encoder
    values = {
        "name": Path(FLAGS.encoder).name,
        "path": FLAGS.encoder,
        "dim": "0",  # the encoder's own
        "max_length": str(FLAGS.max_length),
        "batch_size": str(FLAGS.batch_size),
        "instruction": FLAGS.instruction,
        "dtype": FLAGS.dtype,
    }
    for key, value in values.items():
        config_lib.override(te, key, value)
    encoder = frozen_encoder.load(te)
    rows = encoder.embed(texts)
    np.save(FLAGS.output, rows)
    print(f"{FLAGS.output}: {rows.shape[0]} x {rows.shape[1]} float32 ({encoder.identity['name']})")


def main(argv: list[str]) -> None:
    del argv
    from jaxclip import caption_embeddings
    from jaxclip import config as config_lib
    from jaxclip import mesh as mesh_lib
    from jaxclip.aot_targets import AotError
    from jaxclip.config import ConfigError
    from jaxclip.data import embedding_store as es
    from jaxclip.data.records import DatasetError

    try:
        if FLAGS.encoder:
            embed_file()
            return
        cfg = _cli.load(FLAGS.config, OVERRIDES)
        if FLAGS.aot:
            from jaxclip import aot_embed

            aot_embed.run(cfg, FLAGS.aot)
            return
        if FLAGS.store_dir:
            config_lib.override(cfg, "text_encoder.store_dir", FLAGS.store_dir)
        mesh_lib.initialize_distributed()
        import jax

        if jax.process_index() != 0:
            logging.set_verbosity(logging.WARNING)  # one process reports
        started = time.perf_counter()
        store_dir = caption_embeddings.build(cfg, progress=FLAGS.progress)
        if jax.process_index() == 0:
            elapsed = time.perf_counter() - started
            print(f"embedding store: {store_dir} ({elapsed:.1f} s)")
    except (es.StoreError, ConfigError, DatasetError, AotError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    _cli.setup_logging()
    app.run(main, argv=ARGV)
