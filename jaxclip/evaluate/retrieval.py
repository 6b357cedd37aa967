"""Image <-> text retrieval, Recall@K, on any captioned evaluation set: the shapes world,
TFDS (coco_captions), converted records.

Every image keeps its first five non-empty captions (COCO's protocol; Flickr30k has five).
Image -> text: an image is retrieved correctly at k when any caption of it (or of an image
the set says is the same, see `EvalSet.image_groups`) is among the k texts most similar to
it. Text -> image: a caption is correct at k when its own image (or one the same) is among
the k most similar images. Ranks are counted in chunks, without sorting or holding the
whole (images x captions) similarity matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import datasets, eval_batches
from jaxclip.evaluate.registry import register_alias, register_family

KS = (1, 5, 10)
OPTIONS = ("split", "n", "name", "prefix", "image", "text")
_CHUNK = 512  # query rows per similarity block


def first_hit_ranks(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
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
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    owner: np.ndarray,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks, text->image ranks). `owner[t]` is the image caption t describes;
    images with equal `groups` ids are the same answer (default: every image its own)."""
    groups = np.arange(len(image_emb)) if groups is None else np.asarray(groups)
    text_group = groups[owner]
    i2t = np.empty(len(image_emb), np.int64)
    for s in range(0, len(image_emb), _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, len(image_emb)))
        relevant = text_group[None, :] == groups[rows][:, None]
        i2t[rows] = first_hit_ranks(image_emb[rows] @ text_emb.T, relevant)
    t2i = np.empty(len(text_emb), np.int64)
    for s in range(0, len(text_emb), _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, len(text_emb)))
        relevant = groups[None, :] == text_group[rows][:, None]
        t2i[rows] = first_hit_ranks(text_emb[rows] @ image_emb.T, relevant)
    return i2t, t2i


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries whose first relevant item ranks within the top k."""
    return {k: float(np.mean(ranks < k)) for k in ks}


class Retrieval:
    def __init__(self, cfg, task: str):
        self.spec, self.data, self.indices = datasets.open_task(cfg, task, OPTIONS, labelled=False)
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = self.spec.prefix()

    @functools.cached_property
    def captions(self) -> dict[int, list[str]]:
        """Dataset index -> its captions (at most five), for readable examples that have one."""
        captions = {}
        for index in self.indices:
            kept = [c.strip() for c in self.data.captions_of(int(index)) if c.strip()]
            if kept:
                captions[int(index)] = kept[: datasets.CAPTIONS_PER_IMAGE]
        if not captions:
            raise datasets.EvalDataError(f"{self.spec.text}: no example has a readable caption.")
        return captions

    def texts(self) -> list[str]:
        """Every caption this evaluator embeds (LIFT precomputes them into its store)."""
        return [c for caps in self.captions.values() for c in caps]

    def run(self, encoders) -> dict[str, float]:
        captions = self.captions
        usable = np.array(sorted(captions), np.int64)
        kept, image_emb, errors = eval_batches.embed_images(
            self.data, usable, self.image_size, encoders, self.max_pixels
        )
        skipped = len(self.indices) - len(kept)
        if skipped:
            example = f", e.g. {errors[0]}" if errors else ""
            logging.warning(
                "%s: skipped %d of %d images%s (unreadable, undecodable or no caption)",
                self.spec.text,
                skipped,
                len(self.indices),
                example,
            )
        if len(kept) < 2:
            raise datasets.EvalDataError(
                f"{self.spec.text}: {len(kept)} usable image(s); retrieval needs at least two."
            )
        texts = [c for i in kept for c in captions[i]]
        owner = np.repeat(np.arange(len(kept)), [len(captions[i]) for i in kept])
        groups = self.data.image_groups(kept)
        i2t, t2i = retrieval_ranks(image_emb, encoders.texts(texts), owner, groups)
        results = {f"{self.prefix}/i2t_r{k}": v for k, v in recall_at_k(i2t).items()}
        results.update({f"{self.prefix}/t2i_r{k}": v for k, v in recall_at_k(t2i).items()})
        # What a random ranking achieves at text -> image R@1, for reading the numbers.
        same = np.bincount(groups)[groups[owner]]
        results[f"{self.prefix}/chance_r1"] = float(np.mean(same) / len(kept))
        results[f"{self.prefix}/images"] = float(len(kept))
        results[f"{self.prefix}/captions"] = float(len(texts))
        results[f"{self.prefix}/skipped"] = float(skipped)
        return results


register_family("retrieval")(Retrieval)
register_alias("retrieval", "retrieval:shapes=val,prefix=retrieval")
