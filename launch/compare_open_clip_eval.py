"""An imported ViT-B/16 evaluated by jaxclip and by open_clip on the same images and texts.

    PYTHONPATH=$PWD /work/main/.venv/bin/python launch/compare_open_clip_eval.py
    python launch/compare_open_clip_eval.py --per_class=4 --captioned=24 --out=/tmp/cmp_eval

Needs the reference extra (PyTorch CPU wheel, open-clip-torch 3.3.0) beside jaxclip; nothing
is downloaded. Steps:

1. open_clip builds `ViT-B-16` with random weights (torch seed, then every tensor perturbed
   so no bias is zero and no gain one) and saves its state dict as safetensors;
2. `launch/convert_weights.py --from open_clip --model ViT-B-16` imports it;
3. two evaluation sets from tests/data_fixtures.py at 224 x 224 px, converted with
   `launch/prepare_data.py`: a class folder (one colour per class) and a captioned folder;
4. `launch/eval.py` evaluates the import: zero-shot top-1/top-5 with CLIP's `simple` prompt,
   image <-> text R@1/5/10;
5. open_clip evaluates its own model on the same records: its tokenizer, its validation
   transform on the decoded images, and metrics computed here with numpy (stable ranking,
   ties to the lower index, as jaxclip's evaluators break them);
6. per-example cosine between jaxclip's features (the import's encoders) and open_clip's.

The records hold 224 x 224 JPEGs (prepare_data re-encodes), so jaxclip's resize-shorter-side
+ centre crop and open_clip's Resize + CenterCrop are both the identity on the same decoded
pixels; the script checks that the two sides' normalized images agree before comparing.
Prints one JSON object and exits 1 when a metric differs or a feature's cosine is below
1 - 1e-6. `--import_model=ViT-B-16-quickgelu` (the wrong activation) shows what a mismatch
looks like. docs/PERFORMANCE.md and docs/weights.md quote a run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SIZE, MODEL = 224, "ViT-B-16"
ZEROSHOT, RETRIEVAL = "zeroshot/colours", "retrieval/captions"


def run_launcher(*args: str) -> str:
    """Runs a launch/ script as a user would; stops with its stderr when it fails."""
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    if out.returncode:
        sys.exit(f"{' '.join(args[:1])} failed:\n{out.stderr[-4000:]}")
    return out.stdout


# --- Inputs ----------------------------------------------------------------------------------


def write_reference_model(path: Path, seed: int):
    """open_clip's ViT-B-16 with random weights, saved as safetensors; returns the model and
    its validation transform."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, preprocess


def write_eval_sets(out: Path, per_class: int, captioned: int) -> tuple[Path, Path]:
    """(labelled records, captioned records), converted from tests/data_fixtures folders."""
    import data_fixtures

    classes = out / "class_folder"
    data_fixtures.make_class_folder(
        classes, data_fixtures.CLASS_NAMES, per_class, image_size=(SIZE, SIZE), fmt="png"
    )
    captions = out / "caption_folder"
    data_fixtures.make_image_folder(
        captions, captioned, captions_per_image=2, image_size=(SIZE, SIZE), fmt="png"
    )
    convert = ["launch/prepare_data.py", "--source", "folder", "--max_side", str(SIZE),
               "--workers", "1", "--noprogress"]  # fmt: skip
    run_launcher(*convert, "--input", str(classes), "--output", str(out / "colours"))
    run_launcher(*convert, "--captions_file", str(captions / "captions.csv"),
                 "--output", str(out / "captions"))  # fmt: skip
    return out / "colours", out / "captions"


def read_records(directory: Path) -> tuple[list[bytes], list, list[str] | None]:
    """(encoded images, labels or caption lists, label names) in record order."""
    from jaxclip.data import records

    source = records.RecordsSource(directory)
    decoded = [records.decode_record(source[i]["raw"]) for i in range(len(source))]
    targets = [r["label"] if source.label_names else r["captions"] for r in decoded]
    return [r["image"] for r in decoded], targets, source.label_names


# --- open_clip's side ------------------------------------------------------------------------


def open_clip_features(model, preprocess, images: list[bytes], texts: list[str]):
    """(normalized image features, normalized text features, preprocessed images NCHW)."""
    import io

    import open_clip
    import torch
    from PIL import Image

    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    tokens = open_clip.get_tokenizer(MODEL)(texts)
    with torch.no_grad():
        image = torch.cat([model.encode_image(c) for c in pixels.split(8)])
        text = torch.cat([model.encode_text(c) for c in tokens.split(32)])
    unit = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    return unit(image), unit(text), pixels.numpy()


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row, the position of the first relevant column after a stable descending sort."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.argmax(np.take_along_axis(relevant, order, axis=1), axis=1)


def zeroshot_metrics(image: np.ndarray, prompts: np.ndarray, labels: np.ndarray) -> dict:
    # One prompt per class: the class vector is its normalized prompt embedding.
    ranks = first_relevant_rank(image @ prompts.T, np.eye(len(prompts), dtype=bool)[labels])
    return {f"{ZEROSHOT}/top{k}": float(np.mean(ranks < k)) for k in (1, 5)}


def retrieval_metrics(image: np.ndarray, text: np.ndarray, owner: np.ndarray) -> dict:
    own = owner[None, :] == np.arange(len(image))[:, None]  # (images, texts)
    i2t = first_relevant_rank(image @ text.T, own)
    t2i = first_relevant_rank(text @ image.T, own.T)
    results = {f"{RETRIEVAL}/i2t_r{k}": float(np.mean(i2t < k)) for k in (1, 5, 10)}
    results.update({f"{RETRIEVAL}/t2i_r{k}": float(np.mean(t2i < k)) for k in (1, 5, 10)})
    return results


# --- jaxclip's side --------------------------------------------------------------------------


def jaxclip_encoders(workdir: Path, overrides: list[tuple[str, str]]):
    """The imported checkpoint's encoders, built as launch/eval.py builds them."""
    from jaxclip import config as config_lib
    from jaxclip import run_setup
    from jaxclip.checkpoint import Checkpointer, abstract_like
    from jaxclip.evaluate import run
    from jaxclip.evaluate.encoders import run_encoders

    cfg, step = run.saved_config(workdir)
    config_lib.apply_overrides(cfg, [("mesh.shape.data", "-1"), *overrides])
    setup = run_setup.build(cfg)
    encoders = run_encoders(setup)
    target = abstract_like(setup.abstract_state["params"], setup.state_shardings["params"])
    checkpointer = Checkpointer(workdir)
    encoders.params = checkpointer.restore_params(step, target)
    checkpointer.close()
    return encoders


def cosine_summary(ours: np.ndarray, theirs: np.ndarray) -> dict:
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ours - theirs).max())}


# --- The comparison --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/compare_open_clip_eval", help="scratch dir")
    parser.add_argument("--per_class", type=int, default=4, help="images per colour class (8)")
    parser.add_argument("--captioned", type=int, default=24, help="captioned images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--eval_batch", type=int, default=8, help="jaxclip eval.batch_size")
    parser.add_argument("--import_model", default=MODEL, help="--model of the import")
    args = parser.parse_args()

    import reference_libs

    if not reference_libs.have_reference():
        sys.exit("error: needs torch + open_clip: pip install -e .[reference] (see pyproject)")
    reference_libs.make_torchvision_importable()
    import torch

    from jaxclip.data.transforms import normalize_images
    from jaxclip.evaluate.eval_batches import eval_view

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, preprocess = write_reference_model(out / "vit_b16.safetensors", args.seed)
    colours, captions = write_eval_sets(out, args.per_class, args.captioned)
    workdir = out / "imported"
    weights = str(out / "vit_b16.safetensors")
    run_launcher("launch/convert_weights.py", "--from", "open_clip", "--input", weights,
                 "--model", args.import_model, "--output", str(workdir))  # fmt: skip

    tasks = (f"zeroshot:records={colours},templates=simple,name=colours",
             f"retrieval:records={captions},name=captions")  # fmt: skip
    overrides = [("data.tokenizer", "clip"), ("eval.batch_size", str(args.eval_batch))]
    run_launcher("launch/eval.py", "--workdir", str(workdir), f"--config.eval.tasks={tasks!r}",
                 *(f"--config.{k}={v}" for k, v in overrides))  # fmt: skip
    ours = json.loads((workdir / "eval_step_0.json").read_text())

    # open_clip on the same records.
    class_images, labels, label_names = read_records(colours)
    caption_images, caption_lists, _ = read_records(captions)
    prompts = [f"a photo of a {name}." for name in label_names]
    texts = [c for caps in caption_lists for c in caps]
    owner = np.repeat(np.arange(len(caption_lists)), [len(c) for c in caption_lists])
    images = class_images + caption_images
    oc_image, oc_text, oc_pixels = open_clip_features(model, preprocess, images, prompts + texts)
    n_cls, n_prompts = len(class_images), len(prompts)
    theirs = zeroshot_metrics(oc_image[:n_cls], oc_text[:n_prompts], np.array(labels))
    theirs.update(retrieval_metrics(oc_image[n_cls:], oc_text[n_prompts:], owner))

    # Same inputs: jaxclip's evaluation view of each record and its normalization.
    # One uint8 step is 1 / 255 / std > 0.01 after normalization: a tiny difference here
    # means both sides fed the model the same pixels.
    views = np.stack([eval_view(b, SIZE) for b in images])
    ours_pixels = np.asarray(normalize_images(views)).transpose(0, 3, 1, 2)
    pixel_diff = float(np.abs(ours_pixels - oc_pixels).max())
    if pixel_diff > 1e-4:
        sys.exit(f"error: the two sides' normalized images differ by up to {pixel_diff}")

    encoders = jaxclip_encoders(workdir, overrides)
    features = {
        "images": cosine_summary(encoders.images(views), oc_image),
        "texts": cosine_summary(encoders.texts(prompts + texts), oc_text),
    }
    metrics = sorted(theirs)
    report = {
        "model": MODEL,
        "imported_as": args.import_model,
        "zeroshot_images": n_cls,
        "classes": len(label_names),
        "retrieval_images": len(caption_images),
        "captions": len(texts),
        "metrics": {k: {"jaxclip": ours[k], "open_clip": theirs[k]} for k in metrics},
        "metrics_equal": all(abs(ours[k] - theirs[k]) < 1e-9 for k in metrics),
        "normalized_pixels_max_abs_diff": pixel_diff,
        "features": features,
        "versions": {"torch": torch.__version__, "open_clip": _open_clip_version()},
    }
    print(json.dumps(report, indent=1))
    worst = min(f["min_cosine"] for f in features.values())
    if not report["metrics_equal"] or worst < 1 - 1e-6:
        sys.exit(f"MISMATCH: metrics equal {report['metrics_equal']}, lowest cosine {worst:.6f}")


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


if __name__ == "__main__":
    main()
