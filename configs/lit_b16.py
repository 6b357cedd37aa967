"""LiT (Zhai et al. 2022): a locked, pretrained ViT-B/16 image tower; only the text side trains.

    python launch/convert_weights.py --from openai --input ViT-B-16.pt --output workdirs/b16_openai
    python launch/train.py --config lit_b16 --workdir workdirs/lit_b16 \\
        --config.init.from=workdirs/b16_openai --config.data.source=records \\
        --config.data.records.paths=/data/my_pairs

`optim.frozen` keeps every image-tower parameter (its projection included) fixed and out of the
optimizer state, so Adam's moments exist for the text tower and the logit scale only, and no
weight gradient of the image tower is applied. The text tower starts from the imported one.
A locked text tower is the mirror image: --config.optim.frozen="('text/.*',)".
"""

from jaxclip.config import load_config


def get_config():
    c = load_config("vit_b16_clip")
    c.init["from"] = "workdirs/b16_openai"
    c.optim.frozen = ("image/.*",)
    c.data.tokenizer = "clip"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.1
    c.train.steps = 50_000
    return c
