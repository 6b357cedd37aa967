"""Visual grounding of a text side: do its caption embeddings know which image they describe?

Two probes of any text side (a CLIP text tower, or a LIFT run's frozen encoder through its
embedding store), on a set with several captions per image (Chen et al., Findings of ACL
2023, who found CLIP-style text encoders better at this than BERT-style ones):

- same-image AUC: the ROC AUC with which caption-caption cosine separates pairs of
  captions of the same image from pairs of captions of different images (exact, from
  ranks; ties count one half). Pairs of identical strings are left out: every encoder
  gives them cosine 1, so they say nothing about it (the shapes world repeats captions).
- linear map recall: a ridge-regularised least-squares map from text embeddings to the
  image embeddings of the same run, fitted on the captions of half the images (even
  positions), then text -> image retrieval among the other half: the fraction of their
  captions whose mapped vector has its own image as the nearest (R@1) or among the five
  nearest (R@5) by cosine.

`same_image_auc` and `linear_map_recall` are plain numpy, so a study can probe any
embeddings against any image features. The shapes world gives each val image its detailed
caption and three short captions of its main object, each in a different training template
(which three rotates with the index); converted records and TFDS sets use their own
captions (the first five, as retrieval does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxclip.data import shapes
from jaxclip.data.images import DEFAULT_MAX_PIXELS
from jaxclip.evaluate import datasets, eval_batches
from jaxclip.evaluate.registry import register_alias, register_family
from jaxclip.evaluate.retrieval import first_hit_ranks, recall_at_k

KS = (1, 5)
OPTIONS = ("split", "n", "name", "prefix", "image", "text")
SHORT_CAPTIONS = 3  # shapes world: short captions per image, besides the detailed one
# Caption pairs grow with the square of the texts: beyond this many texts the AUC is taken on
# an evenly spaced subset of the images (4,096 texts are 8.4M pairs).
AUC_MAX_TEXTS = 4096
# Ridge strengths tried, relative to the mean eigenvalue of the centred texts' T^T T.
RIDGE_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
DEFAULT_RIDGE = 1e-2  # when too few images are left to choose one on


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores above a negative), ties one half, from average ranks."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs positives and negatives, got {n_pos} and {n_neg}.")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Equal scores share the mean of the (1-based) ranks they occupy.
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.reshape(-1)]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def same_image_auc(
    text_emb: np.ndarray, image_ids: np.ndarray, text_ids: np.ndarray | None = None
) -> float:
    """ROC AUC of caption-caption cosine: same-image pairs against different-image pairs.

    `image_ids[t]` is the image text t describes; every unordered pair of rows counts once.
    Rows with equal `text_ids` (the same string) are not paired (default: all distinct).
    """
    emb = _unit(text_emb)
    ids = np.asarray(image_ids)
    keep = np.triu(np.ones((len(emb), len(emb)), bool), k=1)
    if text_ids is not None:
        text_ids = np.asarray(text_ids)
        keep &= text_ids[:, None] != text_ids[None, :]
    scores = (emb @ emb.T)[keep]
    return roc_auc(scores, (ids[:, None] == ids[None, :])[keep])


def _ridge_map(texts: np.ndarray, targets: np.ndarray, ridge: float):
    """The affine map x -> (x - mean) W + target mean minimising the squared error plus
    lambda ||W||^2, lambda = ridge * (mean eigenvalue of the centred texts' T^T T)."""
    text_mean, target_mean = texts.mean(0), targets.mean(0)
    t, y = texts - text_mean, targets - target_mean
    lam = ridge * max(float(np.sum(t * t)) / t.shape[1], 1e-12)
    if len(t) < t.shape[1]:  # the smaller system: n x n (dual) rather than D x D
        w = t.T @ np.linalg.solve(t @ t.T + lam * np.eye(len(t)), y)
    else:
        w = np.linalg.solve(t.T @ t + lam * np.eye(t.shape[1]), t.T @ y)
    return lambda x: (x - text_mean) @ w + target_mean


def _map_ranks(text, ids, images, fit_images, query_images, ridge) -> tuple:
    """After a map fitted on the captions of `fit_images`: the rank of each query-image
    caption's own image among the query images, and its cosine with it."""
    fitted = np.isin(ids, fit_images)
    mapped = _ridge_map(text[fitted], images[ids[fitted]], ridge)
    queries = np.isin(ids, query_images)
    sims = _unit(mapped(text[queries])) @ images[query_images].T
    relevant = ids[queries][:, None] == query_images[None, :]
    return first_hit_ranks(sims, relevant), sims[relevant]


def linear_map_recall(
    text_emb: np.ndarray,
    image_ids: np.ndarray,
    image_emb: np.ndarray,
    *,
    ks: Sequence[int] = KS,
    ridge: float | None = None,
) -> dict[str, float]:
    """Text -> image retrieval through a least-squares map fitted on the other images.

    `image_ids[t]` is the row of `image_emb` that text t describes. The map is fitted on
    the texts of the images at even rows and tested on those at odd rows, each caption
    against every odd-row image. `ridge` (relative, see `_ridge_map`): None picks the one
    of `RIDGE_GRID` with the best mean reciprocal rank (then mean cosine to the own image)
    on a quarter of the fitting images held out from the fit (`DEFAULT_RIDGE` when fewer
    than two are left).
    Returns {"r1": .., "r5": .., "chance_r1": .., "ridge": ..}.
    """
    text, images = _unit(text_emb), _unit(image_emb)
    ids = np.asarray(image_ids)
    fit, test = np.arange(0, len(images), 2), np.arange(1, len(images), 2)
    if len(test) < 2 or not np.isin(ids, test).any() or not np.isin(ids, fit).any():
        raise ValueError(
            f"linear_map_recall needs captions of at least two images in each half, got "
            f"{len(images)} images with captions of {len(np.unique(ids))}."
        )
    held = fit[3::4][np.isin(fit[3::4], ids)]  # fitting images held out to choose the ridge
    inner = np.setdiff1d(fit, held)
    if ridge is None and len(held) < 2:
        ridge = DEFAULT_RIDGE
    if ridge is None:

        def held_out_score(r: float) -> tuple[float, float]:
            ranks, own = _map_ranks(text, ids, images, inner, held, r)
            return float(np.mean(1.0 / (1 + ranks))), float(np.mean(own))

        ridge = max(RIDGE_GRID, key=held_out_score)
    ranks, _ = _map_ranks(text, ids, images, fit, test, ridge)
    results = {f"r{k}": v for k, v in recall_at_k(ranks, ks).items()}
    return {**results, "chance_r1": 1.0 / len(test), "ridge": float(ridge)}


def shapes_captions(scene: shapes.Scene, index: int) -> list[str]:
    """The detailed caption of a shapes-world scene and SHORT_CAPTIONS short captions of its
    main object, each in another training template (which ones rotates with the index)."""
    phrase = shapes.object_phrase(scene.main)
    templates = shapes.PROMPT_TEMPLATES
    short = [templates[(index + k) % len(templates)].format(phrase) for k in range(SHORT_CAPTIONS)]
    return [shapes.detailed_caption(scene), *short]


class Grounding:
    def __init__(self, cfg, task: str):
        self.spec, self.data, self.indices = datasets.open_task(cfg, task, OPTIONS, labelled=False)
        self.image_size = int(cfg.data.image_size)
        self.max_pixels = int(cfg.data.get("max_image_pixels", 0) or DEFAULT_MAX_PIXELS)
        self.prefix = self.spec.prefix()

    def _captions_of(self, index: int) -> list[str]:
        if isinstance(self.data, datasets.ShapesSet):
            return shapes_captions(self.data.world.scene(index), index)
        return self.data.captions_of(index)

    @functools.cached_property
    def captions(self) -> dict[int, list[str]]:
        """Dataset index -> its distinct captions (at most five), for examples with one."""
        captions = {}
        for index in self.indices:
            kept = dict.fromkeys(c.strip() for c in self._captions_of(int(index)) if c.strip())
            if kept:
                captions[int(index)] = list(kept)[: datasets.CAPTIONS_PER_IMAGE]
        if not any(len(c) > 1 for c in captions.values()):
            raise datasets.EvalDataError(
                f"{self.spec.text}: no example has two different captions; the grounding "
                f"probe pairs captions of the same image, so it needs a set with several "
                f"captions per image (COCO, Flickr30k, records converted with a captions list)."
            )
        return captions

    def texts(self) -> list[str]:
        """Every caption this evaluator embeds (LIFT precomputes them into its store)."""
        return [c for caps in self.captions.values() for c in caps]

    def _image_embeddings(self, encoders) -> tuple[list[int], np.ndarray]:
        usable = np.array(sorted(self.captions), np.int64)
        kept, emb, errors = eval_batches.embed_images(
            self.data, usable, self.image_size, encoders, self.max_pixels
        )
        if len(kept) < len(self.indices):
            example = f", e.g. {errors[0]}" if errors else ""
            skipped = len(self.indices) - len(kept)
            logging.warning("%s: skipped %d images%s", self.spec.text, skipped, example)
        if len(kept) < 4:
            raise datasets.EvalDataError(
                f"{self.spec.text}: {len(kept)} usable image(s); the grounding probe needs at "
                f"least four (two to fit the map, two to retrieve among)."
            )
        return kept, emb

    def run(self, encoders) -> dict[str, float]:
        kept, image_emb = self._image_embeddings(encoders)
        texts = [c for i in kept for c in self.captions[i]]
        image_ids = np.repeat(np.arange(len(kept)), [len(self.captions[i]) for i in kept])
        text_emb = encoders.texts(texts)
        text_ids = np.unique(texts, return_inverse=True)[1].reshape(-1)
        pairs = np.ones(len(texts), bool)
        if len(texts) > AUC_MAX_TEXTS:
            images = datasets.subset(len(kept), AUC_MAX_TEXTS * len(kept) // len(texts))
            pairs = np.isin(image_ids, images)
        try:
            mapped = linear_map_recall(text_emb, image_ids, image_emb)
            auc = same_image_auc(text_emb[pairs], image_ids[pairs], text_ids[pairs])
        except ValueError as e:  # too few usable images or caption pairs
            raise datasets.EvalDataError(f"{self.spec.text}: {e}") from e
        p = self.prefix
        return {
            f"{p}/same_image_auc": auc,
            **{f"{p}/map_r{k}": mapped[f"r{k}"] for k in KS},
            f"{p}/chance_r1": mapped["chance_r1"],
            f"{p}/map_ridge": mapped["ridge"],
            f"{p}/images": float(len(kept)),
            f"{p}/texts": float(len(texts)),
            f"{p}/skipped": float(len(self.indices) - len(kept)),
        }


register_family("grounding")(Grounding)
register_alias("grounding", "grounding:shapes=val,prefix=grounding")
