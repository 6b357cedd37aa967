"""A tiny CLIP on the built-in shapes world; trains on a laptop CPU in minutes.

python launch/train.py --config demo --workdir workdirs/demo
"""

from jaxclip.config import base_config


def get_config():
    c = base_config()
    c.model.embed_dim = 128
    c.model.act = "gelu"
    c.model.image.variant = "demo/8"  # width 128, 4 layers, 4 heads; 64 px -> 8x8 patches
    c.model.text.width = 128
    c.model.text.depth = 2
    c.model.text.heads = 4
    c.model.text.context_length = 16  # short captions are at most 8 tokens
    # Four layers compile fast unrolled, and on a CPU the unrolled step skips the scan's
    # stacked activation copies (~9 % of the step's CPU time, docs/PERFORMANCE.md).
    c.model.scan_layers = False

    c.data.image_size = 64
    c.data.batch_size = 64
    c.data.context_length = 16
    c.data.worker_count = 1
    c.data.shapes.max_objects = 1
    c.data.shapes.caption_style = "short"

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05

    c.train.steps = 1500
    c.train.log_every = 25
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    return c
