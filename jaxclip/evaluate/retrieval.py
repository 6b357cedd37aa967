"""Image <-> text retrieval, Recall@K, on a held-out split, captions in the training style.

A retrieved item counts as correct when its caption is the query's own caption text: in a
procedural world two images can share a caption, and either is a right answer.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxclip.data.pipeline import make_source
from jaxclip.evaluate.registry import register

KS = (1, 5)


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks=KS) -> dict[int, float]:
    """similarity (Q, N); relevant (Q, N) bool. Fraction of queries with a hit in the top k."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


@register("retrieval")
class Retrieval:
    def __init__(self, cfg):
        style = cfg.eval.retrieval_caption_style or cfg.data.shapes.caption_style
        source = make_source(
            cfg.data, "val", num_examples=cfg.eval.num_examples, caption_style=style
        )
        self.source = source
        # Captions are cheap (no rendering); images are rendered on first use.
        self.captions = [source.caption(i) for i in range(len(source))]
        caps = np.array(self.captions)
        self.same_caption = caps[:, None] == caps[None, :]

    @functools.cached_property
    def images(self) -> np.ndarray:
        return np.stack([self.source[i]["image"] for i in range(len(self.source))])

    def texts(self) -> list[str]:
        return list(self.captions)

    def run(self, encoders) -> dict[str, float]:
        image_emb = encoders.images(self.images)
        text_emb = encoders.texts(self.captions)
        sim = image_emb @ text_emb.T
        i2t = recall_at_k(sim, self.same_caption)
        t2i = recall_at_k(sim.T, self.same_caption)
        results = {f"retrieval/i2t_r{k}": v for k, v in i2t.items()}
        results.update({f"retrieval/t2i_r{k}": v for k, v in t2i.items()})
        # What a random ranking achieves at R@1, for reading the numbers.
        results["retrieval/chance_r1"] = float(self.same_caption.sum(1).mean() / len(self.captions))
        return results
