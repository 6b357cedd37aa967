"""Exports loaded by open_clip and transformers themselves give jaxclip's features.

Needs the reference extra (torch CPU wheel, open-clip-torch, transformers); skipped without it.
"""

import numpy as np
import pytest
from reference_libs import require_reference
from test_weights import FEATURES, OPEN_CLIP_DIR, _assert_close, _features

from jaxclip.weights import convert
from jaxclip.weights import workdir as workdir_lib


@pytest.fixture(scope="module")
def libs():
    require_reference()
    import open_clip
    import torch
    import transformers

    return open_clip, torch, transformers


def _export(tmp_path, fmt):
    convert.import_weights("open_clip", OPEN_CLIP_DIR, tmp_path / "w")
    cfg, params, _ = workdir_lib.read_params(tmp_path / "w")
    convert.export_weights(fmt, tmp_path / "w", tmp_path / fmt)
    images, tokens, mask = (FEATURES[f"open_clip_{k}"] for k in ("images", "tokens", "mask"))
    # The run's tokenizer (shapes, <eot> = 3) decides where exported models pool.
    tokens = tokens.copy()
    tokens[np.arange(len(tokens)), mask.sum(1) - 1] = 3
    tokens = np.where((tokens == 3) & (np.cumsum(tokens == 3, 1) > 1), 0, tokens)
    return (images, tokens, mask), _features(cfg, params, images, tokens, mask)


def _tensor(out):
    return (out if hasattr(out, "numpy") else out.pooler_output).detach().numpy()


def test_open_clip_loads_the_export_and_gives_jaxclips_features(libs, tmp_path):
    open_clip, torch, _ = libs
    (images, tokens, _), (image, text) = _export(tmp_path, "open_clip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'open_clip'}")
    with torch.no_grad():
        theirs_image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
        theirs_text = model.encode_text(torch.from_numpy(tokens).long())
    _assert_close(theirs_image.numpy(), image)
    _assert_close(theirs_text.numpy(), text)


def test_transformers_loads_the_export_and_gives_jaxclips_features(libs, tmp_path):
    _, torch, transformers = libs
    (images, tokens, mask), (image, text) = _export(tmp_path, "hf")
    model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs_image = model.get_image_features(
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)
        )
        theirs_text = model.get_text_features(
            input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask)
        )
    _assert_close(_tensor(theirs_image), image)
    _assert_close(_tensor(theirs_text), text)


def test_clip_processor_tokenizes_like_jaxclip(libs, tmp_path):
    """An export with CLIP's tokenizer: CLIPTokenizer's ids equal jaxclip's on plain texts.

    (transformers' CLIPTokenizer skips ftfy and HTML unescaping: texts with entities such as
    "&amp;" or mojibake tokenize differently there; docs/weights.md says so.)
    """
    _, _, transformers = libs
    from jaxclip.clip_tokenizer import clip_tokenizer
    from jaxclip.weights import architectures as arch_lib

    arch = convert.read_foreign("open_clip", OPEN_CLIP_DIR).arch
    out = tmp_path / "hf"
    out.mkdir()
    convert._write_hf_clip_tokenizer(out, 77)  # the tokenizer files of an hf export
    texts = ["A photo of a DOG.", "two cats & a bird", "café 東京", "x " * 100]
    processor = transformers.CLIPTokenizer.from_pretrained(out)
    theirs = processor(texts, padding="max_length", max_length=77, truncation=True)
    ours, mask = clip_tokenizer()(texts)
    for row, ids, m in zip(theirs["input_ids"], ours, mask, strict=True):
        n = int(m.sum())
        assert list(row[:n]) == list(ids[:n])
    assert arch_lib.name_of(arch) is None
