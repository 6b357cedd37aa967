"""What every study shares: train a config variant, evaluate it, judge the numbers, report.

A study is a module with `NAME`, `CLAIM` (the paper's statement, with its figure) and
`run(ctx) -> Results`. `ctx.train(name, overrides)` trains one variant of the study's base
config (the `demo` config shrunk, `scale()`), `ctx.evaluate(run, tasks)` restores its last
step and runs the named evaluators, `ctx.encoders(run)` hands back its image and text
encoders for measurements a study computes itself. `write_report` turns the returned
`Results` into results.json, report.md (its table generated from the same numbers) and PNG
plots; nothing in a report is written by hand.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxclip import config as config_lib
from jaxclip import flops as flops_lib
from jaxclip import run_setup
from jaxclip import train as train_lib
from jaxclip.checkpoint import Checkpointer, abstract_like
from jaxclip.data import shapes
from jaxclip.evaluate import registry
from jaxclip.evaluate.encoders import Encoders, run_encoders

# Smallest difference a verdict may call real even when two seeds happen to agree closely:
# one example in a hundred (the evaluation sets hold a few hundred examples).
NOISE_FLOOR = 0.01
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def scale(quick: bool) -> dict[str, object]:
    """Overrides of the `demo` config for a study run.

    Full: the demo's image tower (width 128, 4 layers) at 32 px with patch 8 (16 patches), a
    2-layer text tower of width 128, batch 32; a study sets its steps (`steps()`): on the
    2-core CPU a training image costs about 8 ms of CPU time here, so a study's runs together
    see about 50k images to stay within ~6 minutes. Quick (tests): the 2-layer width-32 "mu"
    tower, 20 steps of batch 16, one device.
    """
    common = {
        "data.image_size": 32,
        "data.worker_count": 0,  # no grain worker processes: the steps are small
        "data.context_length": 24,  # detailed captions of 3 objects are 15 words
        "model.text.context_length": 24,
        "train.eval_every": 10**9,  # evaluated once, at the last step
        "train.keep_checkpoints": 1,
        "eval.batch_size": 256,
    }
    if quick:
        return {
            **common,
            "model.image.variant": "mu/8",
            "model.embed_dim": 32,
            "model.text.width": 32,
            "model.text.depth": 1,
            "model.text.heads": 2,
            "data.batch_size": 16,
            "data.shapes.num_train": 2048,
            "data.shapes.num_eval": 64,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 5,
            "eval.num_examples": 64,
            **steps(True, 20),
        }
    return {
        **common,
        "model.image.variant": "demo/8",
        "model.embed_dim": 128,
        "model.text.width": 128,
        "model.text.depth": 2,
        "model.text.heads": 4,
        "data.batch_size": 32,
        "data.shapes.num_train": 50_000,
        "data.shapes.num_eval": 512,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 50,
        "eval.num_examples": 512,
        **steps(False, 600),
    }


def steps(quick: bool, count: int) -> dict[str, object]:
    """Train `count` steps in full mode (quick mode keeps its 20), one checkpoint at the end."""
    count = 20 if quick else count
    return {
        "train.steps": count,
        "train.checkpoint_every": count,
        "train.log_every": max(1, count // 10),
    }


def lift_overrides(store_dir: Path) -> dict[str, object]:
    """configs/demo_lift.py's changes (frozen MiniLM), its store inside the study's runs."""
    return {
        "model.kind": "lift",
        "model.image.pool": "mean",
        "model.embed_dim": 384,
        "text_encoder.name": "all-MiniLM-L6-v2",
        "text_encoder.dim": 384,
        "text_encoder.max_length": 32,
        "text_encoder.auto_build": True,
        "text_encoder.store_dir": str(store_dir),
    }


def has_config_key(dotted: str) -> bool:
    return dotted in config_lib.flat_keys(config_lib.base_config())


def available_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(tasks whose evaluator is registered, tasks whose evaluator is missing)."""
    known, missing = [], []
    for task in tasks:
        (known if registry.is_registered(task) else missing).append(task)
    return known, missing


@dataclasses.dataclass
class Run:
    name: str
    cfg: ml_collections.ConfigDict
    workdir: Path
    overrides: dict[str, object]
    train_results: dict[str, float]
    wall_s: float


@dataclasses.dataclass
class Results:
    """What a study measured. `rows`: variant -> metric -> value, shown as the table in
    `columns` order; `verdict`: from `judge`; `plots`: (file name, title, x label, y label,
    {series: (xs, ys)}); `notes`: plain lines for the report."""

    rows: dict[str, dict[str, float]]
    columns: list[str]
    verdict: dict
    notes: list[str] = dataclasses.field(default_factory=list)
    plots: list[tuple] = dataclasses.field(default_factory=list)


class Context:
    """One study's training runs, under `out/runs/`, at one scale and base seed."""

    def __init__(self, out: Path, *, quick: bool, seed: int, tasks: list[str]):
        self.out, self.quick, self.seed = out, quick, seed
        self.runs_dir = out / "runs"
        self.tasks, self.missing = available_tasks(tasks)
        self.runs: dict[str, Run] = {}
        # Quick runs are tiny: one device compiles faster than a mesh of simulated ones.
        self.devices = jax.devices()[:1] if quick else jax.devices()

    def seeds(self, name: str, count: int) -> list[tuple[str, int]]:
        """Runs of variant `name` over `count` seeds (one in quick mode: no noise estimate)."""
        return seeds(name, 1 if self.quick else count)

    def config(self, overrides: dict[str, object], seed: int) -> ml_collections.ConfigDict:
        cfg = config_lib.load_config("demo")
        values = {**scale(self.quick), "seed": seed, "eval.tasks": repr(tuple(self.tasks))}
        values.update(overrides)
        config_lib.apply_overrides(cfg, [(k, str(v)) for k, v in values.items()])
        return cfg

    def train(self, name: str, overrides: dict[str, object], seed_offset: int = 0) -> Run:
        """Trains variant `name` from scratch (its workdir is emptied first)."""
        cfg = self.config(overrides, self.seed + seed_offset)
        workdir = self.runs_dir / name
        if workdir.exists():
            import shutil

            shutil.rmtree(workdir)
        start = time.perf_counter()
        results = train_lib.train(cfg, workdir, devices=self.devices, progress=False)
        run = Run(name, cfg, workdir, dict(overrides), results, time.perf_counter() - start)
        self.runs[name] = run
        return run

    def encoders(self, run: Run, text_lookup=None) -> Encoders:
        """The run's last step as image and text encoders (parameters restored)."""
        setup = run_setup.build(run.cfg, self.devices)
        encoders = run_encoders(setup)
        if text_lookup is not None:
            encoders.text_lookup = text_lookup
        checkpointer = Checkpointer(run.workdir)
        target = abstract_like(setup.abstract_state["params"], setup.state_shardings["params"])
        encoders.params = checkpointer.restore_params(max(checkpointer.all_steps()), target)
        checkpointer.close()
        return encoders

    def evaluate(self, run: Run, tasks: list[str] | None = None, encoders=None) -> dict:
        """The trained run's scores on `tasks` (default: the study's), from its last step."""
        if tasks is None:
            return {k[len("eval/") :]: v for k, v in run.train_results.items() if "eval/" in k}
        known, _ = available_tasks(tasks)
        cfg = self.config({**run.overrides, "eval.tasks": repr(tuple(known))}, run.cfg.seed)
        return registry.run_all(registry.build_evaluators(cfg), encoders or self.encoders(run))


def flops_per_step(cfg: ml_collections.ConfigDict) -> float:
    """Analytic training FLOPs of one step (3x forward, jaxclip/flops.py) at the batch."""
    return flops_lib.model_flops(cfg).train * cfg.data.batch_size


def val_pairs(cfg: ml_collections.ConfigDict, n: int) -> tuple[np.ndarray, list[str]]:
    """n val-split images with their clean captions in the training caption style."""
    world = shapes.ShapesWorld(
        split="val",
        num_examples=n,
        image_size=cfg.data.image_size,
        seed=cfg.data.seed,
        max_objects=cfg.data.shapes.max_objects,
        caption_style=cfg.data.shapes.caption_style,
    )
    images = np.stack([world[i]["image"] for i in range(n)])
    return images, [world.clean_caption(i) for i in range(n)]


def similarity_margin(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str]) -> dict:
    """Mean cosine of matching pairs, of non-matching pairs, and their difference (float64).

    A pair is non-matching when the two captions differ: the shapes world repeats captions,
    and a repeated caption describes the other image as well as its own.
    """
    sim = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    caption_ids = np.unique(np.asarray(captions), return_inverse=True)[1]
    negative = caption_ids[:, None] != caption_ids[None, :]
    pos, neg = float(np.diag(sim).mean()), float(sim[negative].mean())
    return {"margin/positive": pos, "margin/negative": neg, "margin/gap": pos - neg}


def judge(effect: float, noise: float, claim: str) -> dict:
    """The verdict rule every study states: an effect counts when it exceeds twice the seed
    noise (the gap between two seeds of one variant, at least NOISE_FLOOR)."""
    threshold = 2 * max(abs(noise), NOISE_FLOOR)
    if not (math.isfinite(effect) and math.isfinite(noise)):
        label = "inconclusive"
    elif effect > threshold:
        label = "reproduced"
    elif effect < -threshold:
        label = "not reproduced"
    else:
        label = "inconclusive"
    rule = (
        f"{claim}: reproduced if effect > 2 x max(seed noise, {NOISE_FLOOR}), not reproduced "
        f"if effect < -that, else inconclusive"
    )
    return {
        "label": label,
        "rule": rule,
        "effect": effect,
        "seed_noise": abs(noise),
        "threshold": threshold,
    }


def combine_verdicts(parts: dict[str, dict]) -> dict:
    """A study with several claims: reproduced only if all are, not reproduced if any is."""
    labels = [p["label"] for p in parts.values()]
    if all(label == "reproduced" for label in labels):
        label = "reproduced"
    elif any(label == "not reproduced" for label in labels):
        label = "not reproduced"
    else:
        label = "inconclusive"
    return {
        "label": label,
        "rule": "all parts reproduced -> reproduced; any part not "
        "reproduced -> not reproduced; else inconclusive",
        "parts": parts,
    }


def machine(devices=None) -> dict:
    devices = list(devices or jax.devices())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "jax": jax.__version__,
        # 1-minute load average when the study ended: other work sharing the cores slows it.
        "load_end": round(os.getloadavg()[0], 2),
    }


def metric(rows: dict[str, dict], names: list[str], key: str) -> float:
    """Mean of `key` over the runs `names` (NaN when a run lacks it)."""
    values = [rows[n].get(key, math.nan) for n in names]
    return float(np.mean(values)) if values else math.nan


def effect_and_noise(
    rows: dict[str, dict], baseline: list[str], treatment: list[str], key: str
) -> tuple[float, float]:
    """(treatment mean - baseline mean, the largest gap between two seeds of one group)."""
    effect = metric(rows, treatment, key) - metric(rows, baseline, key)
    gaps = [
        abs(rows[group[0]].get(key, math.nan) - rows[group[1]].get(key, math.nan))
        for group in (baseline, treatment)
        if len(group) >= 2
    ]
    return effect, max(gaps) if gaps else math.nan


def seeds(name: str, count: int) -> list[tuple[str, int]]:
    """[(run name, seed offset)]: `name`, `name_seed1`, ..."""
    return [(name if i == 0 else f"{name}_seed{i}", i) for i in range(count)]
