"""Wall times of importing and exporting a random-weight CLIP (`launch/benchmark.py
--what=weights`).

    python launch/benchmark.py --what=weights --weights_models=ViT-B-16,ViT-L-14

The weights are written in open_clip's safetensors layout first (not timed); then
import = read + convert + checks + Orbax write of step 0, export open_clip / hf = Orbax read +
convert + safetensors write, each timed once, one after the other.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from jaxclip.weights import architectures as arch_lib
from jaxclip.weights import convert, files, open_clip_format
from jaxclip.weights import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class ConversionTimes:
    model: str
    file_mb: float  # the open_clip safetensors file
    import_s: float
    export_open_clip_s: float
    export_hf_s: float


def architecture(model: str) -> arch_lib.ClipArchitecture:
    """An open_clip name (`ViT-B-16`, `ViT-L-14-quickgelu`) or an open_clip config JSON."""
    if model.endswith(".json"):
        return arch_lib.from_open_clip_config(json.loads(Path(model).read_text()))
    return arch_lib.named_architecture(model)


def random_open_clip_file(model: str, path: Path, seed: int = 0) -> None:
    """Random float32 weights of `model` (std 0.02) as an open_clip safetensors file."""
    arch = architecture(model)
    abstract = workdir_lib.abstract_params(convert.imported_config(arch))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, abstract)
    files.write_safetensors(open_clip_format.to_state_dict(params, arch), path)


def conversion_times(model: str, scratch: str | Path) -> ConversionTimes:
    """Times one import and both exports of `model` in the directory `scratch` (created, and
    removed afterwards; it holds four copies of the weights at the end)."""
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        source = scratch / "open_clip_model.safetensors"
        random_open_clip_file(model, source)
        workdir = scratch / "imported"
        seconds = []
        for step in (
            lambda: convert.import_weights("open_clip", source, workdir, model=model),
            lambda: convert.export_weights("open_clip", workdir, scratch / "open_clip"),
            lambda: convert.export_weights("hf", workdir, scratch / "hf"),
        ):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        return ConversionTimes(model, source.stat().st_size / 1e6, *seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
