"""The CLIP demo trained with SigLIP's pairwise sigmoid loss instead of InfoNCE.

    python launch/train.py --config demo_siglip --workdir workdirs/demo_siglip

Temperature and bias start at the paper's values (Zhai et al. 2023): t = exp(t'), t' = log 10,
and b = -10, so the many negative pairs start near zero loss. Everything else is the `demo`
config's, so the two runs compare the losses directly.
"""

import math

from jaxclip.config import load_config


def get_config():
    c = load_config("demo")
    c.loss.kind = "siglip"
    c.model.init_logit_scale = math.log(10.0)
    c.model.logit_bias = -10.0
    return c
