"""Image decoding and host-side geometry: decode, random-resized crop + flip, centre crop.

Everything here runs in grain worker processes on encoded bytes and returns uint8 HWC arrays;
normalization happens on device (`transforms.normalize_images`).

Decoding is guarded: PIL reads only the header first, so an image whose declared size is
absurd (a decompression bomb) is refused before any pixel is decoded. JPEGs are decoded with
`draft`, which lets libjpeg scale by 1/2, 1/4 or 1/8 while decoding when the target is much
smaller than the stored image.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# 89.5 M pixels is PIL's own warning threshold; web images above it are nearly always bombs.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageError(ValueError):
    """The bytes are not a usable image (undecodable, truncated, or too large)."""


class DecompressionBombError(ImageError):
    """The header declares more pixels than allowed; nothing was decoded."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size=None):
    """Encoded bytes -> RGB PIL image. Raises ImageError for anything unusable.

    `draft_size` (w, h): the smallest size the caller needs; lets JPEG decode at reduced scale.
    """
    if not data:
        raise ImageError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # header only
            width, height = image.size
            if width * height > max_pixels:
                raise DecompressionBombError(
                    f"image declares {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels} (possible decompression bomb); refused before decoding"
                )
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", tuple(int(s) for s in draft_size))
            image.load()  # decodes; raises on truncated data
            if image.mode != "RGB":  # (convert copies even an RGB image)
                image = image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecompressionBombError(f"refused before decoding: {e}") from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object, not the data
        raise ImageError("cannot decode image: not a recognized image format") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot decode image: {e}") from e
    if min(image.size) < 1:
        raise ImageError(f"image has no pixels ({image.size[0]}x{image.size[1]})")
    return image


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (log-uniform); falls back to the largest centred crop within `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> np.ndarray:
    """Training view: random crop resized to size x size, randomly mirrored. uint8 HWC."""
    left, top, w, h = random_resized_crop_box(*image.size, rng, scale, ratio)
    crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if flip and rng.random() < 0.5:
        # Mirrored by PIL before the one copy into NumPy: numpy's copy of a reversed view
        # of 3-byte pixels costs about 7x as much.
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.uint8)


def resize_center_crop(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """Evaluation view: shorter side resized to `size`, then the centre size x size. uint8 HWC
    (a label or depth map: resample=NEAREST, its own dtype)."""
    width, height = image.size
    factor = size / min(width, height)
    new_w = max(size, int(round(width * factor)))
    new_h = max(size, int(round(height * factor)))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # Resize only the region that survives the crop, in one call.
    box = (left / factor, top / factor, (left + size) / factor, (top + size) / factor)
    crop = image.resize((size, size), resample, box=box)
    return np.asarray(crop, dtype=np.uint8 if image.mode == "RGB" else None)
