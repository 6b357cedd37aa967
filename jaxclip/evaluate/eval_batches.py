"""Reading an evaluation set chunk by chunk: decode (or take the rendered pixels), resize the
shorter side and centre-crop to the model's size, on a thread pool."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from jaxclip.data import images as images_lib
from jaxclip.evaluate.datasets import EvalSet


def eval_view(
    data: bytes, size: int, max_pixels: int = images_lib.DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image -> uint8 (size, size, 3): shorter side to `size`, centre crop."""
    image = images_lib.decode_image(data, max_pixels=max_pixels, draft_size=(size, size))
    return images_lib.resize_center_crop(image, size)


@dataclasses.dataclass
class Batch:
    """The decodable examples of one chunk, plus why the others were skipped."""

    indices: np.ndarray  # dataset indices of the decoded examples
    images: np.ndarray  # uint8 (len(indices), size, size, 3)
    items: list[dict]  # their `EvalSet.read` dicts, without the image bytes
    errors: list[str]


def image_batches(
    eval_set: EvalSet,
    indices: Sequence[int],
    size: int,
    batch_size: int,
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Reads `indices` chunk by chunk and decodes each chunk on a thread pool (PIL releases
    the GIL), so only one chunk of encoded and decoded images is in memory at a time."""
    workers = max(1, min(8, os.cpu_count() or 1))

    def decode(item: dict) -> np.ndarray | str:
        if "error" in item:
            return item["error"]
        if "pixels" in item:  # rendered at the evaluation size already
            return item["pixels"]
        try:
            return eval_view(item["image"], size, max_pixels)
        except images_lib.ImageError as e:
            return str(e)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(indices), batch_size):
            chunk = [int(i) for i in indices[start : start + batch_size]]
            items = [eval_set.read(i) for i in chunk]
            decoded = list(pool.map(decode, items))
            ok = [j for j, d in enumerate(decoded) if not isinstance(d, str)]
            yield Batch(
                indices=np.array([chunk[j] for j in ok], np.int64),
                images=(
                    np.stack([decoded[j] for j in ok])
                    if ok
                    else np.zeros((0, size, size, 3), np.uint8)
                ),
                items=[
                    {k: v for k, v in items[j].items() if k not in ("image", "pixels")} for j in ok
                ],
                errors=[d for d in decoded if isinstance(d, str)],
            )


def embed_images(
    eval_set: EvalSet,
    indices: Sequence[int],
    size: int,
    encoders,
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
) -> tuple[list[int], np.ndarray, list[str]]:
    """(indices of the decodable images, their embeddings, why the others were skipped)."""
    kept, embeddings, errors = [], [], []
    for batch in image_batches(eval_set, indices, size, encoders.batch_size, max_pixels):
        errors += batch.errors
        if len(batch.indices):
            kept.extend(int(i) for i in batch.indices)
            embeddings.append(encoders.images(batch.images))
    return kept, (np.concatenate(embeddings) if embeddings else np.zeros((0, 0))), errors
