"""The demo's CLIP train step in jaxclip against open_clip's, timed alternately in one sitting.

    python launch/compare_open_clip_step.py --open_clip_python=/tmp/ref-openclip/bin/python
    python launch/compare_open_clip_step.py --baseline_root=/tmp/jaxclip-before  # + an old tree

Architecture of the `demo` config in both: ViT width 128, 4 layers, 4 heads, patch 8 at
64 px; text width 128, 2 layers, 4 heads, context 16; exact GELU; embedding 128; batch 64;
AdamW; 2 threads. Each framework runs in its own process (open_clip in a separate virtualenv:
open-clip-torch 3.3.0 with a CPU PyTorch), started once and kept warm; the driver asks them
in turn for `--steps` timed steps, `--rounds` times, and prints the per-round times and the
ratio of each adjacent pair, so a load change on a shared machine shows as spread rather
than bias. jaxclip's step receives uint8 images and normalizes them inside the step, as in
training; open_clip's receives normalized float images, as its loader delivers them.

The open_clip environment: `pip install torch (CPU wheel)`, then `pip install --no-deps
open-clip-torch==3.3.0 timm ftfy regex huggingface-hub safetensors tqdm wcwidth`. PyPI's
torchvision is a CUDA build whose C++ ops cannot load next to a CPU torch; open_clip only
imports its transforms (pure Python), so the worker loads that package without running
torchvision/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH, IMAGE, CONTEXT, VOCAB, EMBED = 64, 64, 16, 35, 128


def open_clip_worker(threads: int):
    """Builds open_clip's CLIP at the demo's size; returns a function running n steps."""
    import importlib.machinery
    import importlib.util

    site = next(p for p in sys.path if p.endswith("site-packages"))
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    torchvision = importlib.util.module_from_spec(spec)
    torchvision.__path__ = [str(Path(site) / "torchvision")]
    sys.modules["torchvision"] = torchvision  # the package without its C++-loading __init__

    import open_clip
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg=dict(image_size=IMAGE, layers=4, width=128, head_width=32, patch_size=8),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=128, heads=4, layers=2),
    )
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(BATCH, 3, IMAGE, IMAGE)
    tokens = torch.randint(1, VOCAB - 1, (BATCH, CONTEXT))
    tokens[:, CONTEXT // 2] = VOCAB - 1  # end-of-text (argmax pooling)
    tokens[:, CONTEXT // 2 + 1 :] = 0

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            image_features, text_features, scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, scale)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    return steps, f"torch {torch.__version__}, open_clip {open_clip.__version__}"


def jaxclip_worker(threads: int, overrides: list[str], root: Path = ROOT):
    """The `demo` config's real train step (run_setup.build + make_train_step) of the
    jaxclip source tree at `root`."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(root))
    import jax
    import numpy as np

    from jaxclip import config as config_lib
    from jaxclip import mesh as mesh_lib
    from jaxclip import run_setup, train_step

    cfg = config_lib.load_config("demo")
    config_lib.apply_overrides(cfg, [o.split("=", 1) for o in overrides])
    setup = run_setup.build(cfg, jax.devices()[:1])
    step = train_step.make_train_step(setup)
    state = run_setup.init_state(setup)
    rng = np.random.default_rng(0)
    mask = np.zeros((BATCH, CONTEXT), np.int32)
    mask[:, : CONTEXT // 2 + 1] = 1
    batch = mesh_lib.global_batch(
        setup.mesh,
        {
            "image": rng.integers(0, 256, (BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
            "tokens": rng.integers(1, VOCAB, (BATCH, CONTEXT)).astype(np.int32) * mask,
            "mask": mask,
        },
    )

    def steps(n: int) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    return steps, f"jax {jax.__version__}, {' '.join(overrides) or 'demo as configured'}"


def serve(kind: str, threads: int, overrides: list[str], root: Path) -> None:
    """Worker loop: build, warm up, then answer each line 'n' with n steps' seconds."""
    # Answers go to the original stdout; anything the libraries print goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # XLA's CPU thread pool ignores OMP_NUM_THREADS and sizes itself from the CPUs the process
    # may run on: pin both workers to `threads` cores so each framework gets the same cores.
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    if kind == "open_clip":
        steps, version = open_clip_worker(threads)
    else:
        steps, version = jaxclip_worker(threads, overrides, root)
        version += f" ({root})"
    steps(3)  # compile / allocate
    print(json.dumps({"ready": version}), file=answers, flush=True)
    for line in sys.stdin:
        print(json.dumps({"seconds": steps(int(line))}), file=answers, flush=True)


def start(python: str, kind: str, args, root: Path = ROOT) -> subprocess.Popen:
    command = [python, __file__, f"--worker={kind}", f"--threads={args.threads}"]
    command += [f"--root={root}"]
    command += [f"--override={o}" for o in args.override]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def ask(worker: subprocess.Popen, line: str | None = None) -> dict:
    if line is not None:
        worker.stdin.write(line + "\n")
        worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open_clip_python", default="/tmp/ref-openclip/bin/python")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="jaxclip key=value")
    parser.add_argument("--baseline_root", help="another jaxclip tree timed alongside")
    parser.add_argument("--worker", choices=["open_clip", "jaxclip"], help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.threads, args.override, Path(args.root))
        return

    workers = {
        "jaxclip": start(sys.executable, "jaxclip", args),
        "open_clip": start(args.open_clip_python, "open_clip", args),
    }
    if args.baseline_root:
        workers["baseline"] = start(sys.executable, "jaxclip", args, Path(args.baseline_root))
    for name, worker in workers.items():  # both warm before any timing
        print(f"{name}: {ask(worker)['ready']}", flush=True)
    per_step = {name: [] for name in workers}
    for r in range(args.rounds):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]  # ABBA: no order bias
        for name in order:
            per_step[name].append(ask(workers[name], str(args.steps))["seconds"] / args.steps)
        times = ", ".join(f"{n} {t[-1]:.3f}" for n, t in per_step.items())
        ratio = per_step["jaxclip"][-1] / per_step["open_clip"][-1]
        print(f"round {r + 1} (s/step): {times}; jaxclip / open_clip {ratio:.2f}", flush=True)
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    summary = {f"{name}_s_per_step": statistics.median(t) for name, t in per_step.items()}
    for name in per_step:
        if name != "open_clip":
            ratios = [a / o for a, o in zip(per_step[name], per_step["open_clip"], strict=True)]
            summary[f"{name}_over_open_clip"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
    summary.update(threads=args.threads, rounds=args.rounds, steps=args.steps)
    summary["overrides"] = args.override
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
