"""LIFT ViT-B/16 against Qwen3-Embedding-0.6B (1024-d): LIFT's recipe with a small LLM embedder.

Qwen3-Embedding-0.6B scores above NV-Embed-v2 on MTEB English v2 (70.7 vs 69.8 in its
authors' tables) at about 1/13 of the size; whether MTEB rank predicts LIFT quality is an
open question. Captions are embedded without an instruction (documents take none), pooled at
the last token. Download the encoder once, embed, train:

    huggingface-cli download Qwen/Qwen3-Embedding-0.6B --local-dir /models/qwen3-embedding-0.6b
    python launch/embed_text.py --config vit_b16_lift_qwen3 \
        --config.text_encoder.path=/models/qwen3-embedding-0.6b
    python launch/train.py --config vit_b16_lift_qwen3 --workdir gs://BUCKET/lift_qwen3 \
        --config.text_encoder.path=/models/qwen3-embedding-0.6b
"""

from jaxclip.config import load_config


def get_config():
    c = load_config("vit_b16_lift")
    c.model.embed_dim = 1024  # the head maps into the encoder's 1024-d space
    c.text_encoder.name = "Qwen/Qwen3-Embedding-0.6B"
    c.text_encoder.dim = 1024
    c.text_encoder.max_length = 77
    c.text_encoder.instruction = ""  # LIFT embeds captions as documents: no instruction
    return c
