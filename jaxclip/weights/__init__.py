"""Pretrained weights in and out: open_clip, OpenAI and Hugging Face CLIP formats."""
