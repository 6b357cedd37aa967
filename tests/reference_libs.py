"""The published CLIP implementations (open_clip, transformers) that parity tests compare with.

They are an optional extra (``pip install -e .[reference]``, after the CPU torch wheel): tests
that need them call ``require_reference()``, which skips when they are absent.

PyPI's torchvision is built against CUDA torch; beside the CPU wheel its C++ ops library does
not load, and importing torchvision then fails while it registers fake kernels for those ops.
open_clip and timm use only torchvision's Python transforms, so declaring the ops' schemas (no
kernels: nothing here calls them) is enough for the import to succeed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
    "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_LIBRARY = []  # keeps the torch.library.Library alive (dropping it unregisters the ops)

REFERENCE_PACKAGES = ("torch", "torchvision", "open_clip", "transformers")


def have_reference() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in REFERENCE_PACKAGES)


def make_torchvision_importable() -> None:
    """Declare torchvision's ops when its C++ library cannot load beside this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or _LIBRARY:
        return
    ops_library = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if ops_library is not None:
            torch.ops.load_library(str(ops_library))
            return
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OPS:
        library.define(schema)
    _LIBRARY.append(library)


def require_reference():
    """Skip the calling test unless open_clip and transformers can be imported."""
    import pytest

    if not have_reference():
        pytest.skip("needs the reference extra: pip install -e .[reference] (see pyproject)")
    make_torchvision_importable()
