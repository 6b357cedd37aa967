"""LIFT ViT-B/16 (Yang et al. 2025): image tower + head trained against NV-Embed-v2 embeddings.

Mean-pooled ViT-B/16 without internal projection, head Linear(768->4096)-GELU-
Linear(4096->4096); batch 16,384; AdamW lr 1e-3, wd 0.2, betas (0.9, 0.98), eps 1e-6;
cosine with 500 warm-up steps; bfloat16 with gradient checkpointing; 512M samples seen.
NV-Embed-v2 (Mistral-7B, latent-attention pooling, 4096-d) embeds captions without an
instruction, sharded over the host's devices. The caption embeddings must exist before
training (the job refuses to start otherwise):

    huggingface-cli download nvidia/NV-Embed-v2 --local-dir /models/nv-embed-v2
    python launch/embed_text.py --config vit_b16_lift --config.text_encoder.path=/models/nv-embed-v2
    python launch/train.py --config vit_b16_lift --workdir gs://BUCKET/vit_b16_lift
    python launch/embed_text.py --config vit_b16_lift --aot v5p-8   # does the encoder fit?
"""

from jaxclip.config import base_config


def get_config():
    c = base_config()
    c.model.kind = "lift"
    c.model.image.variant = "B/16"
    c.model.image.pool = "mean"
    c.model.embed_dim = 4096
    c.model.act = "quick_gelu"
    c.model.dtype = "bfloat16"
    c.model.remat = True

    c.text_encoder.name = "nvidia/NV-Embed-v2"
    c.text_encoder.dim = 4096
    c.text_encoder.max_length = 77  # 323 for long synthetic captions
    c.text_encoder.instruction = ""  # LIFT: captions without an instruction prefix
    c.text_encoder.dtype = "bfloat16"

    c.data.image_size = 224
    c.data.batch_size = 16384
    c.data.worker_count = 16

    c.loss.kind = "contrastive"  # or "cosine": LIFT's no-negative alternative
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.2
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6

    # Data parallel, as vit_b16_clip and for the same reasons (a 1.2 GiB train state);
    # --config.mesh.shape.fsdp=8 shards it (ZeRO-3) where memory is short.
    c.mesh.shape.data = -1
    c.mesh.shape.fsdp = 1

    c.train.steps = 512_000_000 // 16384
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    return c
