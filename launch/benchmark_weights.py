"""Import/export wall times of random-weight CLIPs.

python launch/benchmark_weights.py ViT-B-16 ViT-L-14
"""

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxclip.weights import architectures as A  # noqa: E402
from jaxclip.weights import convert, files, open_clip_format  # noqa: E402
from jaxclip.weights import workdir as wd  # noqa: E402

out = Path("/tmp/bench_w")
shutil.rmtree(out, ignore_errors=True)
out.mkdir()
for name in sys.argv[1:]:
    arch = A.named_architecture(name)
    abstract = wd.abstract_params(convert.imported_config(arch))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s, rng=rng: rng.standard_normal(s.shape, np.float32) * 0.02, abstract
    )
    src = out / f"{name}.safetensors"
    files.write_safetensors(open_clip_format.to_state_dict(params, arch), src)
    t = time.perf_counter()
    convert.import_weights("open_clip", src, out / f"{name}_w", model=name)
    ti = time.perf_counter() - t
    t = time.perf_counter()
    convert.export_weights("open_clip", out / f"{name}_w", out / f"{name}_oc")
    to = time.perf_counter() - t
    t = time.perf_counter()
    convert.export_weights("hf", out / f"{name}_w", out / f"{name}_hf")
    th = time.perf_counter() - t
    size = src.stat().st_size / 1e6
    print(f"{name}: import {ti:.1f} s, export open_clip {to:.1f} s, export hf {th:.1f} s", end="")
    print(f", file {size:.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
