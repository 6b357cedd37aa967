"""Write tests/fixtures/decoder_llm/: tiny random Qwen3, Qwen2 and Mistral models in Hugging Face
format, with the hidden states and pooled embeddings that `transformers` computes for them.

The fixture is the parity reference for ``jaxclip.models.decoder_embedder``. It needs PyTorch,
so it runs in a throwaway virtual environment, never the project's::

    python3 -m venv /tmp/ref-hf
    /tmp/ref-hf/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/ref-hf/bin/pip install transformers==5.23.0 torch==2.13.0 tokenizers==0.23.3 \
        safetensors==0.8.0 "numpy<2.6"
    HF_HUB_OFFLINE=1 /tmp/ref-hf/bin/python launch/make_decoder_fixture.py

Nothing is downloaded: the models are built from configs with fixed seeds, the tokenizer is a
byte-level BPE trained here on fixed text. Per architecture a directory holds what a Hub
checkpoint holds (config.json, tokenizer.json, tokenizer_config.json, safetensors):

- ``qwen3``: saved as ``Qwen3Model`` (tensor names without a prefix, like Qwen3-Embedding),
  its config.json rewritten in the transformers-4 style of the published checkpoints
  (top-level ``rope_theta``), a tokenizer that appends ``<|endoftext|>``.
- ``qwen2``: q/k/v biases, YaRN rope scaling (transformers-5 ``rope_parameters``), split by
  ``save_pretrained`` into two safetensors files with ``model.safetensors.index.json``.
- ``mistral``: saved as ``MistralForCausalLM`` with tied embeddings (names under ``model.``),
  a sliding window, a tokenizer that prepends ``<s>``.

Every model is reloaded from its directory and run by transformers (eager attention, float32)
on TEXTS tokenized by its own tokenizer, causal and bidirectional (a 4D padding-only mask, as
NV-Embed does), padded left and right. ``reference.npz`` holds, under
``<arch>/<attention>/<side>/``, ``input_ids`` and ``attention_mask`` (as transformers padded
them), ``last`` and ``mean``
(last-token and masked-mean pooling, L2-normalized) for all texts, and ``hidden`` (the
final hidden states at real tokens, concatenated) for the first HIDDEN_TEXTS texts.
``rope_reference.npz`` holds transformers' inverse frequencies and attention factors for
the rope_scaling types jaxclip implements.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before importing anything from Hugging Face

TEXTS = [
    "",
    "a",
    "circle",
    "Star!",
    "a red circle",
    "two blue squares",
    "a red circle left of a small blue star",
    "a small blue star right of a red circle",
    "a large green triangle above a yellow square",
    "three purple hexagons in a row, and one orange pentagon below them",
    "The quick brown fox jumps over the lazy dog.",
    "What's the colour of the 3rd shape?",
    "Version 2.0.1 was released on 2024-03-15 at 10:45.",
    "Café naïve résumé façade",
    "東京は日本の首都です",
    "emoji 🙂🚀 are bytes too",
    "A man is eating food.",
    "A woman is playing the violin on a crowded street corner at night.",
    "Sentence embeddings map text to dense vectors so that similar meanings end up close.",
    "In contrastive language-image pretraining, an image encoder and a text encoder are "
    "trained jointly so that the embedding of each image lies close to the embedding of "
    "its caption and far from the captions of the other images in the batch.",
    "red red red red red red red red red red red red",
    "Whitespace   \t tabs\nand newlines",
    "supercalifragilisticexpialidocious",
    "#hashtag @mention $100 50% & more",
    "a tiny white circle below a big black square",
    "an orange diamond inside a grey ring, next to 4 small cyan dots",
    "Call 555-0123 or e-mail info@example.com",
    "Pi is approximately 3.14159; e is about 2.71828.",
    "a photo of a dog",
    "It is a photo of a cat.",
    "x " * 30,
    "the end",
]
HIDDEN_TEXTS = 12  # hidden states are stored for this many texts (fixture size)
VOCAB = 500  # BPE vocabulary; the models' embedding tables have 512 rows
CORPUS = TEXTS * 3 + [
    "the a of and to in is on with left right above below next inside small large tiny big",
    "red green blue yellow purple orange white black grey cyan circle square star triangle",
]

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.1,  # larger than the default so attention and the MLP matter
)


def _tokenizer(kind: str):
    """A byte-level BPE trained on CORPUS, with Qwen-style or Mistral-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>"] if kind == "qwen" else ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "qwen":
        # Qwen's own normalization and split (digits one by one), which transformers'
        # Qwen2Tokenizer imposes whatever tokenizer.json says; the real files carry them too.
        from tokenizers import Regex, normalizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "qwen":  # Qwen3-Embedding's tokenizer appends the end-of-text token itself
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
        )
        settings = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left")
    else:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
        settings = dict(
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
            padding_side="right",
        )  # fmt: skip
    return tok, settings


def _build(arch: str):
    import torch
    import transformers as tf

    torch.manual_seed({"qwen3": 0, "qwen2": 1, "mistral": 2}[arch])
    if arch == "qwen3":
        rope = {"rope_type": "default", "rope_theta": 1e6}  # Qwen3-Embedding's theta
        config = tf.Qwen3Config(
            **COMMON, rms_norm_eps=1e-6, attention_bias=False, rope_parameters=rope
        )
        model = tf.Qwen3Model(config)
    elif arch == "qwen2":
        rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                "original_max_position_embeddings": 128}  # fmt: skip
        config = tf.Qwen2Config(**COMMON, rms_norm_eps=1e-6, rope_parameters=rope)
        model = tf.Qwen2Model(config)
    else:
        config = tf.MistralConfig(
            **COMMON, rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=True
        )
        model = tf.MistralForCausalLM(config)
    # The default init leaves norms at 1 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def _v4_style_config(path: Path) -> None:
    """Rewrite rope settings as the published (transformers 4) checkpoints write them."""
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _save(arch: str, out: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    d = out / arch
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*"):
        old.unlink()
    model = _build(arch)
    shard = "300KB" if arch == "qwen2" else "50MB"
    model.save_pretrained(d, max_shard_size=shard, safe_serialization=True)
    if arch != "qwen2":
        _v4_style_config(d / "config.json")
    tok, settings = _tokenizer("qwen" if arch.startswith("qwen") else "mistral")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **settings)
    fast.save_pretrained(d)
    return d


def _pool(hidden, mask, side: str):
    """Last-token and masked-mean pooling, L2-normalized, as the published embedders do."""
    import torch
    import torch.nn.functional as F

    if side == "left":
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    m = mask[..., None].to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1)
    return F.normalize(last, dim=-1), F.normalize(mean, dim=-1)


def _run(d: Path, attention: str, side: str) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = side
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = {}
    if attention == "bidirectional":
        # A 4D additive mask is used as given: only padding keys are hidden, no causal triangle.
        keep = mask[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1)
        kwargs["attention_mask"] = torch.zeros(keep.shape).masked_fill(
            ~keep, torch.finfo(torch.float32).min
        )
    else:
        kwargs["attention_mask"] = mask
    with torch.no_grad():
        hidden = model(input_ids=ids, **kwargs).last_hidden_state
    last, mean = _pool(hidden, mask, side)
    real = mask[:HIDDEN_TEXTS].bool()
    return {
        "input_ids": ids.numpy().astype(np.int32),
        "attention_mask": mask.numpy().astype(np.int32),
        "last": last.numpy(),
        "mean": mean.numpy(),
        "hidden": hidden[:HIDDEN_TEXTS][real].numpy(),
    }


def _rope_reference() -> dict[str, np.ndarray]:
    """transformers' inverse frequencies and attention factor per rope_scaling type."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "linear": {"rope_type": "linear", "factor": 2.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                        "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    }  # fmt: skip
    out = {}
    for name, params in cases.items():
        config = tf.Qwen3Config(
            **{**COMMON, "head_dim": 64}, rope_parameters={"rope_theta": 1e5, **params}
        )
        inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
        out[f"{name}/inv_freq"] = inv_freq.numpy().astype(np.float64)
        out[f"{name}/attention_factor"] = np.float64(factor)
        out[f"{name}/config"] = np.str_(json.dumps({"rope_theta": 1e5, **params}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/decoder_llm")
    args = parser.parse_args()

    import tokenizers
    import torch
    import transformers

    out = Path(args.out)
    arrays: dict[str, np.ndarray] = {
        "texts": np.array(TEXTS, dtype=np.str_),
        "hidden_texts": np.int32(HIDDEN_TEXTS),
        "torch_version": np.str_(torch.__version__),
        "transformers_version": np.str_(transformers.__version__),
        "tokenizers_version": np.str_(tokenizers.__version__),
    }
    for arch in ("qwen3", "qwen2", "mistral"):
        d = _save(arch, out)
        for attention in ("causal", "bidirectional"):
            for side in ("left", "right"):
                for key, value in _run(d, attention, side).items():
                    arrays[f"{arch}/{attention}/{side}/{key}"] = value
        files = sorted(p.name for p in d.iterdir())
        print(f"wrote {d}: {files}")
    np.savez_compressed(out / "reference.npz", **arrays)
    np.savez_compressed(out / "rope_reference.npz", **_rope_reference())
    print(f"wrote {out / 'reference.npz'} and {out / 'rope_reference.npz'}")


if __name__ == "__main__":
    main()
