"""LIFT's evaluation texts: the store's precomputed embeddings, else the frozen encoder, now.

A LIFT run embeds every text its configured evaluators use when the store is built
(`registry.eval_texts`), so training evaluates from the store alone. Evaluating a saved
checkpoint on a task it was not trained with (launch/eval.py with
`--config.eval.tasks="('zeroshot:imagenet2012',)"`) needs prompts the store never saw. They
are embedded here by the configured frozen encoder, the same one the store was validated
against, and rounded to the store's float16, so they equal what a rebuilt store would hold.
The alternative, rebuilding the store, would re-read and re-hash every training caption to
add a few thousand prompts. Where the encoder cannot run here (another encoder than MiniLM,
or its weights are not installed), the error says which texts are missing and how to
rebuild the store with them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxclip import mesh as mesh_lib
from jaxclip.data import embedding_store as store_lib


class LiftTextLookup:
    """Callable texts -> float32 (n, dim) embeddings, for `Encoders(text_lookup=...)`."""

    def __init__(self, cfg: ml_collections.ConfigDict, store: store_lib.EmbeddingStore):
        self.cfg, self.store = cfg, store
        listed = store.path / "eval_texts.json"
        self.stored = set(json.loads(listed.read_text())) if listed.is_file() else set()
        self.computed: dict[str, np.ndarray] = {}
        self._embed_fn = None

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embed_fn is None:
            local = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
            try:
                self._embed_fn, _ = store_lib.make_embed_fn(self.cfg, local)
            except Exception as e:
                raise store_lib.StoreError(
                    f"{len(texts)} evaluation text(s) are not in the embedding store "
                    f"{self.store.path} (first {texts[:2]}) and the frozen encoder cannot "
                    f"embed them here: {e}\nRebuild the store with these evaluation tasks in "
                    f"the config: `{store_lib.rebuild_command(self.cfg.name, self.store.path)}` "
                    f"plus --config.eval.tasks=..."
                ) from e
        rows = np.asarray(self._embed_fn(texts), np.float32)
        return rows.astype(store_lib.STORE_DTYPE).astype(np.float32)  # as the store keeps them

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        missing = sorted({t for t in texts if t not in self.stored and t not in self.computed})
        if missing:
            logging.info(
                "Embedding %d evaluation texts absent from the store with %s.",
                len(missing),
                self.cfg.text_encoder.name,
            )
            self.computed.update(zip(missing, self._embed(missing), strict=True))
        out = np.empty((len(texts), self.store.dim), np.float32)
        from_store = [i for i, t in enumerate(texts) if t in self.stored]
        if from_store:
            out[from_store] = self.store.eval_text_embeddings([texts[i] for i in from_store])
        for i, t in enumerate(texts):
            if t not in self.stored:
                out[i] = self.computed[t]
        return out
