"""Fine-tune imported CLIP ViT-B/16 weights (OpenAI's or open_clip's) end to end.

Import the weights once, then train from them in a new workdir:

    python launch/convert_weights.py --from openai --input ViT-B-16.pt --output workdirs/b16_openai
    python launch/train.py --config vit_b16_finetune --workdir workdirs/b16_finetune \\
        --config.init.from=workdirs/b16_openai --config.data.source=records \\
        --config.data.records.paths=/data/my_pairs

OpenAI's B/16 (QuickGELU, CLIP's BPE tokenizer, 224 px). A small learning rate with a short
warm-up keeps the pretrained features; the logit scale starts from the imported value.
"""

from jaxclip.config import load_config


def get_config():
    c = load_config("vit_b16_clip")
    c.init["from"] = "workdirs/b16_openai"
    c.data.tokenizer = "clip"
    c.data.batch_size = 1024
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.1
    c.train.steps = 20_000
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    return c
