"""Images with per-pixel targets for the dense probes: the shapes world, or a folder.

A folder (`dense_seg:folder=DIR`, `dense_depth:folder=DIR`) holds

    DIR/images/<stem>.<jpg|png|...>    RGB images, any size
    DIR/labels/<stem>.png              dense_seg: one channel (L or palette P) class ids,
                                       255 = ignore; the same size as its image
    DIR/depth/<stem>.png               dense_depth: uint16 depth, `depth_scale` metres per
                                       unit (default 0.001: millimetres), 0 = no depth

Every image needs its target file (a missing one is an error at start-up). Images get the
evaluation view (shorter side to cfg.data.image_size, centre crop, bicubic); targets the
same crop with nearest-neighbour resampling. The pairs are split by a fixed permutation,
`train_fraction` (default 0.5) to fit the head on, the rest to score it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jaxclip.data import images as images_lib
from jaxclip.evaluate import datasets

TARGET_DIRS = {"seg": "labels", "depth": "depth"}
IGNORE = 255
SPLIT_SEED = 0


class MissingTargetError(datasets.EvalDataError):
    """An image in DIR/images without its label or depth PNG."""


def _missing_message(root: Path, missing: list[str], sub: str) -> str:
    return (
        f"Dense folder {root}: {len(missing)} image(s) have no {sub}/<stem>.png, e.g. "
        f"{root / sub / missing[0]}.png for {root / 'images'}/{missing[0]}.*; every "
        f"DIR/images/<stem>.<ext> needs DIR/{sub}/<stem>.png (see docs/evaluation.md)."
    )


class DenseFolder:
    """The (image, target) pairs of a folder, `target` "seg" or "depth"."""

    def __init__(self, root: str | Path, target: str):
        self.root, self.sub = Path(root), TARGET_DIRS[target]
        images = self.root / "images"
        if not images.is_dir():
            raise datasets.EvalDataError(
                f"Dense folder {self.root} has no images/ subfolder; the layout is "
                f"DIR/images/<stem>.jpg with DIR/{self.sub}/<stem>.png."
            )
        found = sorted(p for p in images.iterdir() if p.suffix.lower() in datasets.IMAGE_SUFFIXES)
        if not found:
            raise datasets.EvalDataError(f"Dense folder {images} holds no images.")
        self.pairs = [(p, self.root / self.sub / f"{p.stem}.png") for p in found]
        missing = [image.stem for image, target in self.pairs if not target.is_file()]
        if missing:
            raise MissingTargetError(_missing_message(self.root, missing, self.sub))

    def __len__(self) -> int:
        return len(self.pairs)


def read_pair(image_path: Path, target_path: Path, size: int, max_pixels: int):
    """(uint8 (size, size, 3) image, integer or uint16 (size, size) target map)."""
    image = images_lib.decode_image(image_path.read_bytes(), max_pixels=max_pixels)
    try:
        target = Image.open(target_path)
        target.load()
    except OSError as e:
        raise images_lib.ImageError(f"cannot read {target_path}: {e}") from e
    if target.mode not in ("L", "P", "I", "I;16", "I;16B"):
        raise images_lib.ImageError(
            f"{target_path} is a {target.mode} image; labels and depth are one channel "
            f"(8-bit class ids or 16-bit depth)."
        )
    if target.size != image.size:
        raise images_lib.ImageError(
            f"{target_path} is {target.size[0]}x{target.size[1]}, its image "
            f"{image_path.name} {image.size[0]}x{image.size[1]}; they must be the same size."
        )
    if target.mode.startswith("I;16"):
        target = target.convert("I")
    nearest = Image.Resampling.NEAREST
    return images_lib.resize_center_crop(image, size), images_lib.resize_center_crop(
        target, size, nearest
    )


class DenseSplit:
    """Some examples of a dense source: `load()` -> (images, maps, errors).

    maps: seg int64 class ids (IGNORE = not labelled), depth float64 with NaN = invalid.
    """

    num_classes: int | None = None  # known for the shapes world; else from the labels

    def __init__(self, reader, indices: np.ndarray):
        self.reader, self.indices = reader, indices

    def load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, maps, errors = [], [], []
        for i in self.indices:
            try:
                image, target = self.reader(int(i))
            except (OSError, images_lib.ImageError) as e:
                errors.append(str(e))
                continue
            images.append(image)
            maps.append(target)
        if not images:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 1, 1)), errors
        return np.stack(images), np.stack(maps), errors


def _shapes_splits(cfg, spec: datasets.TaskSpec, target: str):
    from jaxclip.data import shapes
    from jaxclip.data.sources import shapes_world

    if spec.location != "val":
        raise datasets.EvalDataError(
            f"Task {spec.text!r}: the shapes world's dense probes score on its val split; "
            f"write '{spec.kind}:shapes=val'."
        )
    n = datasets.count_option(spec, "n", cfg.eval.num_examples)
    splits = []
    for split in ("train", "val"):
        world = shapes_world(cfg.data, split, num_examples=n, max_objects=3, single_object=False)

        def reader(i, world=world):
            example = world[i]
            field = example["mask"].astype(np.int64) if target == "seg" else example["depth"]
            return example["image"], field

        splits.append(DenseSplit(reader, np.arange(n)))
        splits[-1].num_classes = len(shapes.SHAPES) + 1 if target == "seg" else None
    return splits


def _folder_splits(cfg, spec: datasets.TaskSpec, target: str):
    folder = DenseFolder(spec.location, target)
    size = int(cfg.data.image_size)
    max_pixels = int(cfg.data.get("max_image_pixels", 0) or images_lib.DEFAULT_MAX_PIXELS)
    try:
        scale = float(spec.options.get("depth_scale", 0.001))
        fraction = float(spec.options.get("train_fraction", 0.5))
    except ValueError as e:
        raise datasets.EvalDataError(f"Task {spec.text!r}: a bad option value ({e}).") from None
    n = datasets.count_option(spec, "n", cfg.eval.get("max_examples", 0))

    def reader(i):
        image, raw = read_pair(*folder.pairs[i], size, max_pixels)
        if target == "seg":
            return image, raw.astype(np.int64)
        return image, np.where(raw > 0, raw.astype(np.float64) * scale, np.nan)

    order = np.random.default_rng(SPLIT_SEED).permutation(datasets.subset(len(folder), n))
    cut = int(round(fraction * len(order)))
    if not 0 < cut < len(order):
        raise datasets.EvalDataError(
            f"Task {spec.text!r}: {len(order)} image(s) with train_fraction={fraction} leave "
            f"no train or no test image; add images or change train_fraction."
        )
    return DenseSplit(reader, np.sort(order[:cut])), DenseSplit(reader, np.sort(order[cut:]))


def open_dense_splits(cfg, spec: datasets.TaskSpec, target: str):
    """(train split, test split) of a dense task."""
    if spec.source == "shapes":
        return _shapes_splits(cfg, spec, target)
    if spec.source == "folder":
        return _folder_splits(cfg, spec, target)
    raise datasets.EvalDataError(
        f"Task {spec.text!r}: dense probes read 'shapes=val' or 'folder=DIR' (DIR/images/ "
        f"with DIR/{TARGET_DIRS[target]}/ PNGs), not {spec.source}."
    )
