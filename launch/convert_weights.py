"""Import open_clip / OpenAI / Hugging Face CLIP weights into a jaxclip workdir, or export one.

    python launch/convert_weights.py --from openai --input ViT-B-16.pt --output workdirs/b16
    python launch/convert_weights.py --from open_clip --input model.safetensors \\
        --model ViT-B-16 --output workdirs/b16 [--image_size 384] [--config.eval.tasks=...]
    python launch/convert_weights.py --from hf --input clip-vit-base-patch16/ --output workdirs/b16
    python launch/convert_weights.py --to open_clip --input workdirs/run [--step N] --output out/
    python launch/convert_weights.py --to hf --input workdirs/run --output out_hf/

An import writes step 0 (config + params) that launch/eval.py --workdir evaluates and a new run
starts from with --config.init.from=WORKDIR. See docs/weights.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
from absl import app, flags, logging  # noqa: E402

flags.DEFINE_enum("from", None, ["open_clip", "openai", "hf"], "Import from this format.")
flags.DEFINE_enum("to", None, ["open_clip", "hf"], "Export to this format.")
flags.DEFINE_string("input", None, "Weights file/directory (import) or workdir (export).")
flags.DEFINE_string("output", None, "Workdir to create (import) or directory (export).")
flags.DEFINE_string("model", None, "open_clip architecture name or config JSON (import).")
flags.DEFINE_string("config", None, "Base config for the import's non-model keys.")
flags.DEFINE_integer("image_size", None, "Resize position embeddings to this size (import).")
flags.DEFINE_integer("step", None, "Step to export (default: the latest).")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from jaxclip import config as config_lib
    from jaxclip.checkpoint import CheckpointError
    from jaxclip.weights import convert
    from jaxclip.weights.architectures import WeightsError

    source_fmt, target_fmt = FLAGS["from"].value, FLAGS.to
    if (source_fmt is None) == (target_fmt is None):
        sys.exit("error: give exactly one of --from FORMAT (import) or --to FORMAT (export)")
    start = time.perf_counter()
    try:
        if source_fmt:
            base = config_lib.load_config(FLAGS.config) if FLAGS.config else None
            if OVERRIDES:
                base = base or config_lib.base_config()
                config_lib.apply_overrides(base, OVERRIDES)
            written = convert.import_weights(
                source_fmt,
                FLAGS.input,
                FLAGS.output,
                model=FLAGS.model,
                base=base,
                image_size=FLAGS.image_size,
            )
        else:
            written = convert.export_weights(target_fmt, FLAGS.input, FLAGS.output, FLAGS.step)
    except (WeightsError, CheckpointError, config_lib.ConfigError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {written} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    ARGV, OVERRIDES = _cli.split_overrides(sys.argv)
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=ARGV)
