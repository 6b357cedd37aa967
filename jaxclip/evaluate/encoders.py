"""Batched, jitted image, patch and text encoders over a model's current parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclip import mesh as mesh_lib
from jaxclip.data.transforms import normalize_images
from jaxclip.tokenizer import Tokenizer


class Encoders:
    """Maps numpy images / caption strings to L2-normalized numpy embeddings.

    Every process passes the same inputs (evaluation sets are small and deterministic);
    batches are sharded over the mesh's batch axes and results come back replicated.
    """

    def __init__(
        self,
        graphdef,
        params,
        mesh: Mesh,
        tokenizer: Tokenizer | None,
        batch_size: int,
        dtype=None,
        text_lookup: Callable[[Sequence[str]], np.ndarray] | None = None,
    ):
        # text_lookup (LIFT): texts were embedded offline by the frozen encoder; look them up.
        self.params, self.mesh, self.tokenizer = params, mesh, tokenizer
        self.text_lookup = text_lookup
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = max(shards, batch_size // shards * shards)
        out = mesh_lib.replicated(mesh)

        def image_fn(p, images):
            model = nnx.merge(graphdef, p)
            return model.encode_image(normalize_images(images, dtype or jnp.float32))

        def text_fn(p, tokens, mask):
            return nnx.merge(graphdef, p).encode_text(tokens, mask)

        def patches_fn(p, images):
            model = nnx.merge(graphdef, p)
            return model.encode_patches(normalize_images(images, dtype or jnp.float32))

        self._image = jax.jit(image_fn, out_shardings=out)
        self._patches = jax.jit(patches_fn, out_shardings=out)
        self._text = jax.jit(text_fn, out_shardings=out)

    def _batches(self, arrays: Sequence[np.ndarray], fn) -> np.ndarray:
        n = len(arrays[0])
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = [a[start : start + self.batch_size] for a in arrays]
            valid = len(chunk[0])
            pad = self.batch_size - valid
            if pad:  # fixed shapes: one compilation for every batch
                chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
            placed = [jax.device_put(c, mesh_lib.batch_sharding(self.mesh, c.ndim)) for c in chunk]
            outputs.append(np.asarray(fn(self.params, *placed))[:valid])
        return np.concatenate(outputs)

    def images(self, images: np.ndarray) -> np.ndarray:
        return self._batches([images], self._image)

    def patch_tokens(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, patches, width): the image tower's per-patch
        features (not normalized; see VisionTransformer.encode_patches)."""
        return self._batches([images], self._patches)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.text_lookup is not None:
            emb = np.asarray(self.text_lookup(list(texts)), np.float32)
            return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-6)
        tokens, mask = self.tokenizer(list(texts))
        return self._batches([tokens, mask], self._text)


def run_encoders(setup, params=None) -> Encoders:
    """The encoders of a built run (`run_setup.RunSetup`): its model graph and mesh, and the
    text side its model kind evaluates with (the text tower, or stored embeddings)."""
    from jaxclip.models.build import compute_dtype

    cfg = setup.cfg
    return Encoders(
        setup.graphdef,
        params,
        setup.mesh,
        setup.tokenizer,
        cfg.eval.batch_size,
        compute_dtype(cfg.model),
        text_lookup=setup.kind.eval_text_lookup(cfg),
    )
