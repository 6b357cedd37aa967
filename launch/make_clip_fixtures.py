"""Write the CLIP parity fixtures (and, once, jaxclip's copy of CLIP's BPE merges).

The fixtures are the references for ``jaxclip.clip_tokenizer`` and ``jaxclip.weights``: open_clip's
tokenizer ids, and the image/text features of tiny random-weight CLIPs built by open_clip and by
``transformers``. They need PyTorch, so this runs in a throwaway environment, never the project's::

    python3.11 -m venv /tmp/ref-clip
    /tmp/ref-clip/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/ref-clip/bin/pip install torch==2.13.0 torchvision==0.28.0 open-clip-torch==3.3.0 \\
        transformers==5.23.0 ftfy==6.3.1 timm==1.0.31
    /tmp/ref-clip/bin/python launch/make_clip_fixtures.py            # tests/fixtures/clip_*.npz
    /tmp/ref-clip/bin/python launch/make_clip_fixtures.py --vocab    # jaxclip/assets merges

(``torch==2.13.0`` keeps pip on the local CPU wheel. PyPI's torchvision is built for CUDA and
cannot load its C++ ops beside the CPU torch; ``tests/reference_libs.py`` declares those ops so
the Python half imports: open_clip uses only its transforms.) Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FIXTURES = ROOT / "tests" / "fixtures"
MERGES = ROOT / "jaxclip" / "assets" / "clip_bpe_merges.txt.gz"
NUM_MERGES = 49408 - 2 * 256 - 2

HAND_WRITTEN = [
    "",
    " ",
    "\n\t  \r\n",
    "a photo of a dog.",
    "A Photo Of A DOG!!!",
    "a red circle left of a small blue star",
    "It's what they've said: we'll see, I'd think, you're sure, I'm not.",
    "IT'S WHAT THEY'VE SAID",
    "don't won't can't shouldn't y'all",
    "1234567890 3.14159 1,000,000 -42 +7 1e-5 0x1F",
    "Version 2.0.1 released 2024-03-15 at 10:45 (UTC+01:00)",
    "e-mail: info@example.com, web: https://example.com/a/b?c=d&e=f#g",
    "#hashtag @mention $100 50% & more * ^ ~ | \\ / < > = _ `",
    "\"double\" 'single' «guillemets» „low“ ‘curly’ “quotes”",
    "Café naïve résumé façade jalapeño coöperate",
    "Straße ÆØÅ æøå Ångström İstanbul ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ",
    "東京は日本の首都です。",
    "北京欢迎你 上海 广州",
    "한국어 문장입니다",
    "Привет, мир! Ёлка",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "emoji 🙂🚀🎉 and 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, skin 👍🏽",
    "🙂",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;apos&#39; &amp;amp; &nbsp;x",
    "&amp;amp;lt;twice&amp;amp;gt;",
    "<b>html</b> <br/> <a href='x'>link</a>",
    "mojibake: Ã©tÃ© â€œquotedâ€\x9d cafÃ©",
    "The Mona Lisa doesn’t have eyebrows.",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ligatures ﬁ ﬂ ﬀ and superscripts ² ³ ¹ and fractions ½ ¼",
    "zero\u200bwidth\u200dspace and\u00a0nbsp and\u3000ideographic",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "control \x01\x02\x7f chars",
    "combining e\u0301 a\u0308 n\u0303",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥ π θ λ",
    "arrows → ← ↑ ↓ ⇒ and boxes ■ □ ▲ ●",
    "currency € £ ¥ ₹ ₩ ₿",
    "<start_of_text> inside and <end_of_text> inside",
    "<|startoftext|>openai names<|endoftext|>",
    "a" * 300,
    "ab" * 200,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "...!!!???,,,;;;:::---",
    "'s 's 's",
    "__init__ snake_case CamelCase kebab-case",
    "C++ C# F# .NET Node.js",
]


WORDS = (
    *("a", "an", "the", "photo", "picture", "of", "dog", "cat", "bird", "car", "tree", "house"),
    *("red", "green", "blue", "small", "large", "running", "jumping", "under", "over", "next"),
    *("to", "on", "in", "with", "without", "and", "or", "but", "very", "quite"),
)


def random_texts(rng: random.Random, count: int) -> list[str]:
    """Varied texts: words, numbers, symbols, other scripts, emoji; some far over 77 tokens."""
    words = list(WORDS)
    pools = [
        words,
        [str(rng.randrange(10**6)) for _ in range(20)],
        list("!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`'\""),
        list("éèêëàâäîïôöùûüçñßøåæœ"),
        list("日本語中文한국어Русскийעבריתعربيελληνικά"),
        ["🙂", "🚀", "🎉", "❤️", "👍🏽", "🇫🇷", "🐶", "🌳"],
        ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "Ã©", "â€™"],
        ["\t", "\n", "  ", "\u00a0", "\u200b"],
    ]
    texts = []
    for i in range(count):
        length = rng.choice([1, 3, 8, 20, 60, 150]) if i % 10 else rng.randint(100, 400)
        pieces = []
        for _ in range(length):
            pool = pools[0] if rng.random() < 0.6 else rng.choice(pools)
            pieces.append(rng.choice(pool))
            pieces.append(rng.choice([" ", " ", " ", "", ", "]))
        text = "".join(pieces)
        texts.append(text.upper() if i % 7 == 0 else text.capitalize() if i % 3 == 0 else text)
    return texts


def write_merges() -> None:
    """jaxclip's copy of the merges CLIP uses: the first 48,894 of open_clip's shipped file."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    assert len(lines) == NUM_MERGES and all(len(line.split()) == 2 for line in lines)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    MERGES.parent.mkdir(parents=True, exist_ok=True)
    MERGES.write_bytes(buffer.getvalue())
    print(f"wrote {MERGES} ({MERGES.stat().st_size} bytes)")


def write_tokenizer_fixture() -> None:
    import open_clip

    texts = HAND_WRITTEN + random_texts(random.Random(0), 300 - len(HAND_WRITTEN))
    ids = open_clip.get_tokenizer("ViT-B-16")(texts).numpy()
    assert ids.max() < 2**16
    path = FIXTURES / "clip_tokenizer_reference.npz"
    np.savez_compressed(
        path,
        texts_json=np.frombuffer(json.dumps(texts).encode("utf-8"), np.uint8),
        ids=ids.astype(np.uint16),
        versions=np.array(json.dumps(_versions())),
    )
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(texts)} texts)")


# Tiny CLIPs: widths 32, 2 layers, 2 heads, 32 px images in 8 px patches, 16-token texts from
# a 512-token vocabulary whose last two ids are start/end of text (so argmax pooling finds EOT).
VOCAB, CONTEXT, SOT_ID, EOT_ID = 512, 16, 510, 511
TINY_OPEN_CLIP = dict(
    embed_dim=16,
    quick_gelu=False,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2),
)
TINY_HF_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=CONTEXT,
    hidden_act="quick_gelu",
    bos_token_id=SOT_ID,
    eos_token_id=EOT_ID,
    pad_token_id=0,
)
TINY_HF_VISION = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
)


def tiny_inputs(seed: int) -> dict[str, np.ndarray]:
    """Normalized NHWC images and token rows <sot> ids <eot> 0..., one truncated to 16."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    tokens = np.zeros((4, CONTEXT), np.int64)
    for row, length in enumerate([2, 5, CONTEXT, 9]):
        tokens[row, :length] = [SOT_ID, *rng.integers(1, SOT_ID, length - 2), EOT_ID]
    mask = (np.arange(CONTEXT)[None] < np.array([2, 5, CONTEXT, 9])[:, None]).astype(np.int32)
    return dict(images=images, tokens=tokens, mask=mask)


def _perturb(model, seed: int) -> None:
    """Random weights everywhere: zero biases and unit gains would hide layout mistakes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def write_open_clip_tiny(out: Path) -> dict[str, np.ndarray]:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_OPEN_CLIP).eval()
    _perturb(model, 0)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        out / "open_clip_model.safetensors",
    )
    (out / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=TINY_OPEN_CLIP), indent=2))
    inputs = tiny_inputs(0)
    with torch.no_grad():
        images = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)
        image = model.encode_image(images).numpy()
        text = model.encode_text(torch.from_numpy(inputs["tokens"])).numpy()
    return {
        **{f"open_clip_{k}": v for k, v in inputs.items()},
        "open_clip_image_features": image,
        "open_clip_text_features": text,
    }


def write_hf_tiny(out: Path) -> dict[str, np.ndarray]:
    import torch
    import transformers

    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=TINY_HF_TEXT, vision_config=TINY_HF_VISION, projection_dim=16
    )
    model = transformers.CLIPModel(config).eval()
    _perturb(model, 1)
    model.save_pretrained(out)
    inputs = tiny_inputs(1)
    with torch.no_grad():
        pixels = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)
        image = _tensor(model.get_image_features(pixel_values=pixels))
        text = _tensor(
            model.get_text_features(
                input_ids=torch.from_numpy(inputs["tokens"]),
                attention_mask=torch.from_numpy(inputs["mask"]),
            )
        )
    return {
        **{f"hf_{k}": v for k, v in inputs.items()},
        "hf_image_features": image,
        "hf_text_features": text,
    }


def _tensor(output) -> np.ndarray:
    """transformers 5 returns an output object where 4.x returned the features tensor."""
    value = output if hasattr(output, "numpy") else output.pooler_output
    return value.numpy()


def write_b16_shapes() -> None:
    """Names and shapes of full-size ViT-B/16 state dicts (random weights, nothing downloaded)."""
    import open_clip
    import transformers

    model = open_clip.create_model("ViT-B-16")
    open_clip_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    config = transformers.CLIPConfig(vision_config=dict(patch_size=16))
    hf_shapes = {k: list(v.shape) for k, v in transformers.CLIPModel(config).state_dict().items()}
    path = FIXTURES / "clip_vit_b16_shapes.json"
    path.write_text(json.dumps(dict(open_clip=open_clip_shapes, hf=hf_shapes), indent=1))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def _versions() -> dict:
    import ftfy
    import open_clip
    import torch
    import transformers

    return dict(
        open_clip=open_clip.__version__,
        transformers=transformers.__version__,
        torch=torch.__version__,
        ftfy=ftfy.__version__,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", action="store_true", help="write jaxclip's merges file")
    args = parser.parse_args()
    import reference_libs

    reference_libs.make_torchvision_importable()
    if args.vocab:
        write_merges()
        return
    FIXTURES.mkdir(parents=True, exist_ok=True)
    write_tokenizer_fixture()
    features = write_open_clip_tiny(FIXTURES / "clip_open_clip_tiny")
    features.update(write_hf_tiny(FIXTURES / "clip_hf_tiny"))
    path = FIXTURES / "clip_tiny_features.npz"
    np.savez_compressed(path, versions=np.array(json.dumps(_versions())), **features)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    write_b16_shapes()


if __name__ == "__main__":
    main()
