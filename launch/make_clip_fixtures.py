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


if __name__ == "__main__":
    main()
