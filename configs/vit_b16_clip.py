"""CLIP ViT-B/16 with the paper's recipe (Radford et al. 2021): 149,620,737 parameters.

Batch 32,768; AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2 on matrices; peak lr 5e-4,
cosine, 2,000 warm-up steps; bfloat16 compute. Sized for a GPU pod or TPU slice:

    python launch/train.py --config vit_b16_clip --workdir gs://BUCKET/vit_b16_clip
    python launch/train.py --config vit_b16_clip --dry_run     # parameter and memory report
"""

from jaxclip.config import base_config


def get_config():
    c = base_config()
    c.model.image.variant = "B/16"
    c.model.image.pool = "cls"
    c.model.embed_dim = 512
    c.model.act = "quick_gelu"
    c.model.text.width = 512
    c.model.text.depth = 12
    c.model.text.heads = 8
    c.model.text.context_length = 77
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.data.image_size = 224
    c.data.batch_size = 32768
    c.data.context_length = 77
    c.data.worker_count = 16
    # CLIP's BPE vocabulary size. Point data.tokenizer at its tokenizers JSON file for real
    # captions; until then the shapes world at 224 px feeds it.
    c.model.text.vocab_size = 49408

    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2

    c.train.steps = 12_800_000_000 // 32768  # 32 epochs of 400M pairs, as in the paper
    c.train.log_every = 50
    c.train.eval_every = 5000
    c.train.checkpoint_every = 1000

    # Data parallel by default: the whole train state is 1.7 GiB (2 % of a v5p chip), so
    # replicating it costs little memory and needs no per-layer weight gathers, and the mesh
    # fits any device count. Switch to ZeRO-3 where memory is short: on 8xH100 at the paper
    # batch --config.mesh.shape.data=1 --config.mesh.shape.fsdp=8 saves 9.9 GiB per GPU
    # (docs/PERFORMANCE.md, "Activation sharding"); ViT-L/14 and larger want fsdp.
    c.mesh.shape.data = -1
    c.mesh.shape.fsdp = 1
    return c
