"""Image <-> text retrieval on a real captioned split (TFDS coco_captions, converted records).

Every image keeps its first five non-empty captions (COCO's protocol; Flickr30k has five).
Image -> text: an image is retrieved correctly at k when ANY of its captions is among the k
texts most similar to it. Text -> image: a caption is correct at k when its own image is
among the k images most similar to it. Ranks are counted in chunks, without sorting or
holding the whole (images x captions) similarity matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import datasets
from jaxclip.evaluate.registry import register_family

KS = (1, 5, 10)
OPTIONS = ("split", "n", "name", "image", "text")
_CHUNK = 512  # query rows per similarity block


def _first_hit_rank(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per row: the position of the first relevant column in a stable descending sort.

    Rows need at least one relevant column. The first relevant column in that order is the
    best-scoring one (lowest index among equals); everything scoring higher, or equal with a
    lower index, comes before it.
    """
    masked = np.where(relevant, sim, -np.inf)
    first = np.argmax(masked, axis=1)
    best = sim[np.arange(len(sim)), first][:, None]
    before = np.arange(sim.shape[1])[None, :] < first[:, None]
    return (sim > best).sum(1) + ((sim == best) & before).sum(1)


def retrieval_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks, text->image ranks); owner[t] is the image caption t describes."""
    num_images = len(image_emb)
    i2t = np.empty(num_images, np.int64)
    for s in range(0, num_images, _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, num_images))
        i2t[rows] = _first_hit_rank(image_emb[rows] @ text_emb.T, owner[None, :] == rows[:, None])
    t2i = np.empty(len(text_emb), np.int64)
    for s in range(0, len(text_emb), _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, len(text_emb)))
        relevant = np.arange(num_images)[None, :] == owner[rows][:, None]
        t2i[rows] = _first_hit_rank(text_emb[rows] @ image_emb.T, relevant)
    return i2t, t2i


def recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    return {k: float(np.mean(ranks < k)) for k in ks}


class RealRetrieval:
    def __init__(self, cfg, task: str):
        self.spec, self.data, self.indices = datasets.open_task(cfg, task, OPTIONS, labelled=False)
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = f"retrieval/{self.spec.name}"

    @functools.cached_property
    def captions(self) -> dict[int, list[str]]:
        """Dataset index -> its captions (at most five), for readable examples that have one."""
        captions = {}
        for index in self.indices:
            item = self.data.read(int(index))
            kept = [c.strip() for c in item.get("captions", []) if c.strip()]
            if kept:
                captions[int(index)] = kept[: datasets.CAPTIONS_PER_IMAGE]
        if not captions:
            raise datasets.EvalDataError(f"{self.spec.text}: no example has a readable caption.")
        return captions

    def texts(self) -> list[str]:
        return [c for caps in self.captions.values() for c in caps]

    def run(self, encoders) -> dict[str, float]:
        captions = self.captions
        usable = np.array(sorted(captions), np.int64)
        kept, image_emb, errors = [], [], []
        for batch in datasets.image_batches(
            self.data, usable, self.image_size, encoders.batch_size, self.max_pixels
        ):
            errors += batch.errors
            if len(batch.indices):
                kept.extend(int(i) for i in batch.indices)
                image_emb.append(encoders.images(batch.images))
        skipped = len(self.indices) - len(kept)
        if skipped:
            example = f", e.g. {errors[0]}" if errors else ""
            message = f"skipped {skipped} of {len(self.indices)} images{example}"
            logging.warning(
                "%s: %s (unreadable, undecodable or no caption)", self.spec.text, message
            )
        if len(kept) < 2:
            raise datasets.EvalDataError(
                f"{self.spec.text}: {len(kept)} usable image(s); retrieval needs at least two."
            )
        texts = [c for i in kept for c in captions[i]]
        owner = np.repeat(np.arange(len(kept)), [len(captions[i]) for i in kept])
        i2t, t2i = retrieval_ranks(np.concatenate(image_emb), encoders.texts(texts), owner)
        results = {f"{self.prefix}/i2t_r{k}": v for k, v in recalls(i2t).items()}
        results.update({f"{self.prefix}/t2i_r{k}": v for k, v in recalls(t2i).items()})
        results[f"{self.prefix}/images"] = float(len(kept))
        results[f"{self.prefix}/captions"] = float(len(texts))
        results[f"{self.prefix}/skipped"] = float(skipped)
        return results


register_family("retrieval")(RealRetrieval)
