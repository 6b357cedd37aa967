"""SigLIP ViT-B/16: the CLIP ViT-B/16 towers trained with the pairwise sigmoid loss.

    python launch/train.py --config vit_b16_siglip --workdir gs://BUCKET/vit_b16_siglip
    python launch/train.py --config vit_b16_siglip --dry_run     # parameter and memory report

From the paper (Zhai et al. 2023; docs/losses.md): the sigmoid loss over the global batch, a
learned temperature t = exp(t') with t' starting at log 10, a learned bias starting at -10, and
a batch of 32,768, around which the paper finds the loss's gains saturate.

Our choices, not confirmed as the paper's ViT-B/16 recipe: the towers, 224 px, 77 text tokens,
AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2, peak lr 5e-4, 2,000 warm-up steps, cosine and
the number of steps are the `vit_b16_clip` config's; the scale keeps CLIP's clamp at 100; the
loss runs in its ring form, 512 columns at a time, whose memory does not grow with the batch.
"""

import math

from jaxclip.config import load_config


def get_config():
    c = load_config("vit_b16_clip")
    c.loss.kind = "siglip"
    c.loss.impl = "ring"
    c.loss.chunk_size = 512
    c.model.init_logit_scale = math.log(10.0)
    c.model.logit_bias = -10.0
    return c
