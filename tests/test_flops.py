"""Analytic model FLOPs: the figure in docs/PERFORMANCE.md, XLA's count, the peak table."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

from jaxclip import aot, flops
from jaxclip import config as config_lib

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def documented(pattern: str) -> float:
    section = DOC.read_text().split("## Model FLOPs and MFU")[1]
    return float(re.search(pattern, section).group(1).replace(",", ""))


def test_vit_b16_clip_flops_and_mfu_equal_the_documented_derivation():
    cfg = config_lib.load_config("vit_b16_clip")
    per_example = flops.model_flops(cfg).train
    assert per_example / 1e9 == pytest.approx(
        documented(r"\*\*([\d.]+) GFLOP per example\*\*"), abs=0.005
    )
    images_per_s = documented(r"At ([\d,]+) images/s on one H100")
    mfu = flops.mfu(images_per_s, per_example, 1, flops.peak_flops("NVIDIA H100 80GB HBM3"))
    assert 100 * mfu == pytest.approx(documented(r"\*\*([\d.]+) % MFU\*\*"), abs=0.05)


def test_analytic_training_flops_are_within_a_tenth_of_xla_count():
    """An independent count: XLA's cost analysis of the demo's compiled step (unrolled
    layers, no remat), which also counts element-wise work and the optimizer."""
    cfg = config_lib.load_config("demo")
    compiled = aot.compile_train_step(aot.unrolled(cfg), jax.devices()[:1])
    xla_per_example = aot.compiled_flops(compiled) / cfg.data.batch_size
    analytic = flops.model_flops(cfg).train
    assert 0.9 < analytic / xla_per_example <= 1.0


def test_patch_dropout_counts_only_the_kept_patches():
    cfg = config_lib.load_config("vit_b16_clip")
    config_lib.override(cfg, "model.image.patch_dropout", "0.5")
    assert flops.image_tokens(cfg) == 98 + 1
    assert flops.image_tokens(cfg, training=False) == 196 + 1
    assert flops.model_flops(cfg).image < flops.model_flops(cfg, training=False).image


@pytest.mark.parametrize(
    "kind,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA B200", 2250),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
    ],
)
def test_device_kinds_map_to_their_bf16_peak(kind, tflops):
    assert flops.peak_flops(kind) == tflops * 1e12


def test_unknown_device_has_no_peak():
    assert flops.peak_flops("cpu") is None
