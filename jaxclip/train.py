"""Training: build everything from a config, then run the loop. Reads top to bottom.

`build()` makes the mesh, tokenizer, abstract model, shardings and optimizer without
allocating parameters; `init_state()` creates the state directly sharded;
`make_train_step()` is the jitted update; `train()` is the loop with data, checkpoints,
evaluation and logging.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

import jaxclip
from jaxclip import config as config_lib
from jaxclip import distributed, losses
from jaxclip import mesh as mesh_lib
from jaxclip.checkpoint import Checkpointer, CheckpointError, abstract_like
from jaxclip.data import bad_records
from jaxclip.data.global_order import GlobalOrderLoader
from jaxclip.data.pipeline import make_tokenizer, train_loader
from jaxclip.data.transforms import normalize_images
from jaxclip.evaluate import registry
from jaxclip.evaluate.encoders import Encoders
from jaxclip.metrics_writer import MetricsWriter
from jaxclip.models.build import build_model, compute_dtype
from jaxclip.models.layers import l2_normalize
from jaxclip.optim import decay_mask, make_optimizer
from jaxclip.tokenizer import Tokenizer


class WorkdirError(RuntimeError):
    """The work directory cannot be used."""


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built abstractly (no parameter is allocated yet)."""

    cfg: ml_collections.ConfigDict
    mesh: Mesh
    tokenizer: Tokenizer
    graphdef: Any
    abstract_state: dict  # {'step', 'params', 'opt_state'} of ShapeDtypeStructs
    state_shardings: dict
    tx: optax.GradientTransformation
    schedule: Any
    model_fn: Any

    @property
    def param_shardings(self):
        return self.state_shardings["params"]


def build(cfg: ml_collections.ConfigDict, devices=None) -> Setup:
    """Mesh, tokenizer, model graph, optimizer and state shardings from the config."""
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, devices)
    tokenizer = make_tokenizer(cfg.data)
    rules = dict(cfg.mesh.rules)
    vocab_size = cfg.model.text.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.text.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set it to 0 to follow the tokenizer."
        )

    def model_fn():
        return build_model(
            cfg.model,
            image_size=cfg.data.image_size,
            vocab_size=vocab_size,
            rngs=nnx.Rngs(cfg.seed),
        )

    abstract_model = nnx.eval_shape(model_fn)
    graphdef, abstract_vars = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(mesh_lib.state_specs(abstract_vars, rules, mesh))
    abstract_params = nnx.to_pure_dict(abstract_vars)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, decay_mask(abstract_vars))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Optimizer moments mirror the parameters' layout; scalars (counts) are replicated.
    opt_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        abstract_opt,
        param_specs,
        transform_non_params=lambda _: jax.sharding.PartitionSpec(),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    specs = {"step": jax.sharding.PartitionSpec(), "params": param_specs, "opt_state": opt_specs}
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    return Setup(
        cfg=cfg,
        mesh=mesh,
        tokenizer=tokenizer,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=mesh_lib.named(mesh, specs),
        tx=tx,
        schedule=schedule,
        model_fn=model_fn,
    )


def init_state(setup: Setup) -> dict:
    """Creates parameters and optimizer state already sharded: no full host copy exists."""

    def init():
        params = nnx.to_pure_dict(nnx.state(setup.model_fn()))
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": setup.tx.init(params),
        }

    return jax.jit(init, out_shardings=setup.state_shardings)()


def make_train_step(setup: Setup):
    """The jitted update: forward both towers, global loss, AdamW; the state is donated."""
    cfg, mesh, graphdef = setup.cfg, setup.mesh, setup.graphdef
    dtype = compute_dtype(cfg.model)

    lift = cfg.model.kind == "lift"
    rules = dict(cfg.mesh.rules)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        images = normalize_images(batch["image"], dtype)
        # Activations inside the towers are sharded by the mesh rules (ZeRO-3 under fsdp).
        with mesh_lib.activation_sharding(mesh, rules):
            if lift:  # the text side is the frozen encoder's stored embedding: no text tower
                out = model(images, rng=rng)
                out["text"] = l2_normalize(batch["text_emb"].astype(jnp.float32))
            else:
                out = model(images, batch["tokens"], batch["mask"], rng=rng)
        return losses.objective(
            out["image"],
            out["text"],
            out["scale"],
            out["bias"],
            mesh=mesh,
            kind=cfg.loss.kind,
            positive_weight=cfg.loss.positive_weight,
            chunk_size=cfg.loss.chunk_size or None,
        )

    def train_step(state, batch):
        # Randomness (patch dropout) follows from the seed and the step: resumes replay it.
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], batch, rng)
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=setup.schedule(state["step"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    text_fields = ("text_emb",) if lift else ("tokens", "mask")
    batch_shardings = {"image": mesh_lib.batch_sharding(mesh, 4)}
    batch_shardings.update({name: mesh_lib.batch_sharding(mesh, 2) for name in text_fields})
    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, batch_shardings),
        out_shardings=(setup.state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates the workdir and proves it is writable before anything expensive starts."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"Cannot write to the workdir {path}: {e.strerror or e}. Pass a directory you can "
            f"write to with --workdir, or fix its permissions (e.g. chmod u+w {path})."
        ) from e
    return path


def checkpoint_meta(setup: Setup) -> dict:
    return {
        "jaxclip_version": jaxclip.__version__,
        "mesh": dict(setup.mesh.shape),
        "num_devices": int(setup.mesh.devices.size),
        "process_count": jax.process_count(),
        "tokenizer": setup.tokenizer.identity,
        "text_encoder": setup.cfg.text_encoder.name if setup.cfg.model.kind == "lift" else None,
    }


# Model keys that change how the model computes, not its parameters: free to change on resume.
_HOW_NOT_WHAT = (
    "dtype",
    "remat",
    "remat_policy",
    "scan_layers",
    "attention",
    "image.patch_dropout",
)


def check_compatible(cfg: ml_collections.ConfigDict, saved_cfg: dict, step_dir: Path) -> None:
    """Refuses to resume a checkpoint whose model differs from the configured one."""
    current = cfg.model.to_dict()
    saved = saved_cfg.get("model", {})
    diffs = [
        k
        for k in sorted(set(config_lib.flat_keys(current)) | set(config_lib.flat_keys(saved)))
        if _get(current, k) != _get(saved, k) and k not in _HOW_NOT_WHAT
    ]
    if diffs:
        detail = ", ".join(
            f"model.{k}: saved {_get(saved, k)!r} vs {_get(current, k)!r}" for k in diffs[:5]
        )
        raise CheckpointError(
            f"The checkpoint in {step_dir} was trained with a different model ({detail}). "
            f"Use the config it was saved with, or a fresh --workdir."
        )


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return list(tree) if isinstance(tree, tuple) else tree


def restore_or_init(
    setup: Setup, checkpointer: Checkpointer, data_iter, loader, step: int | None = None
):
    """The latest (or given) checkpoint, resharded onto this mesh; else a fresh state.

    The data iterator resumes where the checkpoint left it. grain saves one iterator state
    per process and data worker; when this run has other counts, a loader whose position
    follows from the step alone (the shapes world's global order) is put at that step.
    """
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        return init_state(setup)
    saved_cfg = checkpointer.read_json(step, "config")
    check_compatible(setup.cfg, saved_cfg, checkpointer.directory)
    target = abstract_like(setup.abstract_state, setup.state_shardings)
    saved_layout = data_layout(checkpointer.read_json(step, "meta"), saved_cfg)
    layout = (jax.process_count(), int(setup.cfg.data.worker_count))
    if data_iter is None or saved_layout == layout:
        state = checkpointer.restore(step, target, data_iter)
    else:
        state = checkpointer.restore(step, target)
        _position_data(loader, data_iter, step, saved_layout, layout, saved_cfg, setup.cfg)
    logging.info("Resumed from step %d in %s", step, checkpointer.directory)
    return state


def data_layout(meta: dict, cfg: dict) -> tuple[int, int]:
    """(processes, data workers per process) that wrote or read a data-iterator state."""
    return int(meta.get("process_count", 1)), int(cfg.get("data", {}).get("worker_count", 0))


# What the shapes world's global order depends on (jaxclip/data/global_order.py).
_ORDER_KEYS = ("source", "batch_size", "seed", "shapes.num_train")


def _position_data(loader, data_iter, step, saved_layout, layout, saved_cfg, cfg) -> None:
    described = (
        f"The checkpoint's data position was saved by {saved_layout[0]} process(es) with "
        f"data.worker_count={saved_layout[1]}; this run has {layout[0]} with "
        f"data.worker_count={layout[1]}."
    )
    if not isinstance(loader, GlobalOrderLoader):
        raise CheckpointError(
            f"{described} A converted-records dataset (data.source='records') reads per-host "
            f"ranges, so its position carries over only to the same layout: run "
            f"{saved_layout[0]} process(es) with --config.data.worker_count={saved_layout[1]}, "
            f"or train in a fresh --workdir."
        )
    saved, now = saved_cfg.get("data", {}), json.loads(config_lib.to_json(cfg))["data"]
    changed = [
        f"data.{k}: saved {_get(saved, k)!r}, now {_get(now, k)!r}"
        for k in _ORDER_KEYS
        if _get(saved, k) != _get(now, k)
    ]
    if changed:
        raise CheckpointError(
            f"{described} The position follows from the step only with the same data order, "
            f"and its settings changed ({'; '.join(changed)}). Use the values the run was "
            f"started with, or a fresh --workdir."
        )
    data_iter.set_state(loader.state_after(data_iter, step))
    logging.info("%s Recomputed it from the step: after global batch %d.", described, step)


def evaluate(setup: Setup, encoders: Encoders, evaluators: dict, params) -> dict[str, float]:
    encoders.params = params
    try:
        return registry.run_all(evaluators, encoders)
    finally:
        encoders.params = None  # params are donated by the next step


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    devices=None,
    stop_at_step: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Trains (or resumes) `cfg` in `workdir`; returns the last metrics and evaluation.

    `stop_at_step` ends this run early at that step (after saving a checkpoint), as a
    preemption would; the schedule still spans `cfg.train.steps`.
    """
    # --- Work directory and logging --------------------------------------------------
    workdir = prepare_workdir(workdir)
    # From here a SIGTERM (preemption) no longer kills the run: it stops at an agreed step.
    preemption = distributed.PreemptionGuard()
    writer = MetricsWriter(workdir)
    if distributed.is_primary():
        (workdir / "config.json").write_text(config_lib.to_json(cfg))

    # --- Mesh, model and optimizer (abstract), data ------------------------------------
    setup = build(cfg, devices)
    logging.info("Mesh: %s", mesh_lib.describe(setup.mesh))
    process_batch = mesh_lib.batch_size_per_process(cfg.data.batch_size, setup.mesh)
    # LIFT: the frozen encoder's caption embeddings, checked before anything compiles.
    store = None
    if cfg.model.kind == "lift":
        from jaxclip.data import text_embeddings

        store = text_embeddings.open_for_training(cfg, progress=progress)
    loader = train_loader(cfg.data, setup.tokenizer, process_batch, text_store=store)
    data_iter = iter(loader)

    # --- State: restore from the workdir, or initialize directly sharded ----------------
    checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    state = restore_or_init(setup, checkpointer, data_iter, loader)
    first_step = int(state["step"])

    # --- Update step and evaluators ------------------------------------------------------
    train_step = make_train_step(setup)
    evaluators = registry.build_evaluators(cfg)
    encoders = Encoders(
        setup.graphdef,
        None,
        setup.mesh,
        setup.tokenizer,
        cfg.eval.batch_size,
        compute_dtype(cfg.model),
        text_lookup=store.eval_text_embeddings if store is not None else None,
    )

    # --- Loop ---------------------------------------------------------------------------
    last_step = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
    results: dict[str, float] = {}
    bar = tqdm(
        total=cfg.train.steps,
        initial=first_step,
        disable=not progress or jax.process_index(),
        desc="train",
        dynamic_ncols=True,
    )
    tick, tick_step = time.perf_counter(), first_step
    in_flight, stopping = None, False
    for step in range(first_step + 1, last_step + 1):
        local = next(data_iter)
        index_sum = int(np.sum(local.pop("index")))
        data_stats = bad_records.pop_metrics(local)  # records read / skipped (this host)
        state, metrics = train_step(state, mesh_lib.global_batch(setup.mesh, local))
        # Wait for the previous step, not this one: one step stays queued (the device never
        # idles) and the bar counts finished steps, so its rate and ETA are real.
        if in_flight is not None:
            in_flight.block_until_ready()
            bar.update(1)
        in_flight = metrics["loss"]
        stopping = preemption.should_stop(setup.mesh)  # the same answer on every process

        if step % cfg.train.log_every == 0 or step == last_step:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            images_per_s = (step - tick_step) * cfg.data.batch_size / max(now - tick, 1e-9)
            tick, tick_step = now, step
            index_sum = distributed.process_sum(index_sum)  # over the global batch
            metrics.update({"images_per_s": images_per_s, "data/index_sum": index_sum})
            metrics.update(data_stats)
            writer.write(step, metrics, prefix="train/")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{images_per_s:.0f}")
            results.update({f"train/{k}": float(v) for k, v in metrics.items()})

        if evaluators and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            scores = evaluate(setup, encoders, evaluators, state["params"])
            writer.write(step, scores, prefix="eval/")
            results.update({f"eval/{k}": v for k, v in scores.items()})
            message = f"step {step} eval: {_format(scores)}"
            if bar.disable:
                logging.info(message)
            else:
                bar.write(message)  # a log line would tear the progress bar
            tick = time.perf_counter()  # evaluation time is not training throughput

        if step % cfg.train.checkpoint_every == 0 or step == last_step or stopping:
            checkpointer.save(
                step,
                state,
                data_iter,
                config_lib.to_json(cfg),
                checkpoint_meta(setup),
                force=True,
            )
        if stopping:
            break
    if in_flight is not None:
        in_flight.block_until_ready()
        bar.update(1)
    bar.close()
    checkpointer.close()  # waits for the last save to be complete on disk
    preemption.close()
    if stopping:
        logging.warning(
            "Preempted at step %d: checkpoint saved; rerun the same command to resume.", step
        )
    writer.close()
    return results


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(scores.items()) if "chance" not in k)
