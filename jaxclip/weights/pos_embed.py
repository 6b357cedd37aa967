"""Image position embeddings resized to another image size (another patch grid)."""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxclip.weights.architectures import WeightsError


def resize_image_pos_embed(pos_embed: np.ndarray, num_tokens: int) -> np.ndarray:
    """(1 + g*g, width) -> (num_tokens, width), num_tokens = 1 + G*G: bicubic on the grid.

    The class token's embedding (row 0) is kept as it is. Resizing runs in float32 with
    ``jax.image.resize`` (Keys cubic, no anti-aliasing), as open_clip does with torch's
    bicubic; the two kernels differ slightly, so the result is close to, not equal to, theirs.
    """
    pos_embed = np.asarray(pos_embed, np.float32)
    old, new = _grid(pos_embed.shape[0]), _grid(num_tokens)
    if old == new:
        return pos_embed
    width = pos_embed.shape[1]
    grid = pos_embed[1:].reshape(old, old, width)
    resized = jax.image.resize(grid, (new, new, width), "bicubic", antialias=False)
    return np.concatenate([pos_embed[:1], np.asarray(resized).reshape(new * new, width)])


def _grid(num_tokens: int) -> int:
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise WeightsError(
            f"{num_tokens} image positions are not a class token plus a square patch grid"
        )
    return side


def adapt_image_size(params: dict, target_pos_rows: int) -> dict:
    """`params` with image/pos_embed resized to `target_pos_rows` rows (a new dict)."""
    image = dict(params["image"])
    image["pos_embed"] = resize_image_pos_embed(image["pos_embed"], target_pos_rows)
    return {**params, "image": image}
