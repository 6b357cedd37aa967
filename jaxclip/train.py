"""Training: the loop, reading top to bottom. One step of training is in `train_step.py`;
building the run (mesh, model, shardings, optimizer) in `run_setup.py`.

`train()` prepares the workdir, builds the run, opens the caption features the model kind
needs, restores the latest checkpoint (or initializes the state directly sharded), starts
the data at the step reached, and loops: step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

import jaxclip
from jaxclip import config as config_lib
from jaxclip import distributed, flops, run_setup
from jaxclip import mesh as mesh_lib
from jaxclip.checkpoint import Checkpointer, CheckpointError, abstract_like
from jaxclip.data import bad_records, pipeline
from jaxclip.data.sources import training_sources
from jaxclip.evaluate import registry
from jaxclip.evaluate.encoders import Encoders, run_encoders
from jaxclip.metrics_writer import MetricsWriter
from jaxclip.run_setup import RunSetup
from jaxclip.train_step import make_train_step


class WorkdirError(RuntimeError):
    """The work directory cannot be used."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was not finite."""


def check_finite(step: int, nonfinite, cfg: ml_collections.ConfigDict, checkpointer) -> int:
    """1 for a non-finite step (waiting for it), 0 else; stops the run at a non-finite step,
    before it is saved, unless train.skip_nonfinite (then its update was skipped)."""
    if not int(nonfinite) or cfg.train.skip_nonfinite:
        return int(nonfinite)
    last = checkpointer.latest_step()
    where = f"step {last} in {checkpointer.directory}" if last is not None else "none yet"
    raise NonFiniteError(
        f"Step {step} gave a non-finite loss or gradient, so training stopped there without "
        f"saving it. The last good checkpoint: {where}; rerunning resumes from it. Lower "
        f"optim.lr or set optim.grad_clip_norm, check the data, or skip such updates with "
        f"--config.train.skip_nonfinite=true."
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


def data_order(cfg: ml_collections.ConfigDict, sources) -> dict:
    """What the global data order depends on: the same values give the same batch at step N."""
    return {
        "batch_size": int(cfg.data.batch_size),
        "seed": int(cfg.data.seed),
        "caption": str(cfg.data.caption),
        "datasets": [
            {
                "name": s.identity["name"],
                "content_hash": s.identity["content_hash"],
                "num_examples": len(s),
                "weight": float(w),
            }
            for s, w in sources
        ],
    }


def checkpoint_meta(setup: RunSetup, order: dict, data_totals: dict) -> dict:
    return {
        "jaxclip_version": jaxclip.__version__,
        "model_kind": setup.kind.name,
        **setup.kind.identity(setup.cfg, setup.tokenizer),
        "mesh": dict(setup.mesh.shape),
        "num_devices": int(setup.mesh.devices.size),
        "process_count": jax.process_count(),
        "data_order": order,
        "data_totals": data_totals,  # bad-record counts over every process, up to this step
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
    setup: RunSetup, checkpointer: Checkpointer, order: dict, step: int | None = None
) -> tuple[dict, dict | None]:
    """(state, bad-record totals) of the latest (or given) checkpoint, resharded onto this
    mesh; else step 0 (`initial_state`): the run's own checkpoints take precedence over
    `init.from`. The data position is the step itself: global batch N is the same for any
    number of processes or data workers, so nothing else is restored."""
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        return initial_state(setup), None
    meta = checkpointer.read_json(step, "meta")
    if meta.get("params_only"):
        raise CheckpointError(
            f"{checkpointer.directory} holds imported weights (parameters only), not a run to "
            f"resume. Start a run from them in a new workdir: --config.init.from="
            f"{checkpointer.directory.parent} --workdir NEW_DIR."
        )
    saved_cfg = checkpointer.read_json(step, "config")
    check_compatible(setup.cfg, saved_cfg, checkpointer.directory)
    check_same_order(meta.get("data_order"), order, checkpointer.directory / str(step))
    target = abstract_like(setup.abstract_state, setup.state_shardings)
    state = checkpointer.restore(step, target)
    logging.info("Resumed from step %d in %s", step, checkpointer.directory)
    # Every process continues its own count; process 0 carries the totals so far.
    return state, meta.get("data_totals") if jax.process_index() == 0 else None


def initial_state(setup: RunSetup) -> dict:
    """Step 0: fresh parameters, or those of `init.from` (imported weights, another run)."""
    source = setup.cfg.init["from"]
    if not source:
        return run_setup.init_state(setup)
    from jaxclip.weights.init_from import initial_params

    params = initial_params(
        setup.cfg, setup.abstract_state["params"], setup.state_shardings["params"]
    )
    logging.info("Starting from the parameters of %s", source)
    return run_setup.init_state(setup, params)


def check_same_order(saved: dict | None, now: dict, step_dir: Path) -> None:
    """Refuses to continue a run whose data order would differ from the one it trained on."""
    if saved is None or saved == now:
        return
    changed = [
        f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]
    ]
    raise CheckpointError(
        f"The checkpoint {step_dir} was trained on another data order, so its step does not "
        f"say where to continue ({'; '.join(changed)}). Use the data settings and datasets the "
        f"run was started with, or a fresh --workdir."
    )


def evaluate(encoders: Encoders, evaluators: dict, params) -> dict[str, float]:
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

    # --- Mesh, model and optimizer (abstract) -----------------------------------------
    setup = run_setup.build(cfg, devices)
    logging.info("Mesh: %s", mesh_lib.describe(setup.mesh))
    # Tokens, or (LIFT) the frozen encoder's stored embeddings, checked before compiling.
    caption_features = setup.kind.caption_features(cfg, setup.tokenizer, progress=progress)
    sources = training_sources(cfg.data)
    order = data_order(cfg, sources)

    # --- State: restore from the workdir, or initialize directly sharded ----------------
    checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    state, data_totals = restore_or_init(setup, checkpointer, order)
    first_step = int(state["step"])

    # --- Data, from the global batch this step trains on --------------------------------
    batches = pipeline.train_loader(
        cfg.data,
        caption_features,
        mesh_lib.batch_size_per_process(cfg.data.batch_size, setup.mesh),
        start_batch=first_step,
        totals=data_totals,
        sources=sources,
    )

    # --- Update step and evaluators ------------------------------------------------------
    train_step = make_train_step(setup)
    evaluators = registry.build_evaluators(cfg)
    encoders = run_encoders(setup)

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
    model_flops, peak = (
        flops.model_flops(cfg).train,
        flops.peak_flops(setup.mesh.devices.flat[0].device_kind),
    )
    num_devices = setup.mesh.devices.size
    in_flight, stopping, skipped = None, False, 0
    try:
        for step in range(first_step + 1, last_step + 1):
            local = next(batches)
            index_sum = int(np.sum(local.pop("index")))  # which records: logged to check order
            state, metrics = train_step(state, mesh_lib.global_batch(setup.mesh, local))
            # Wait for the previous step, not this one: one step stays queued (the device never
            # idles) and the bar counts finished steps, so its rate and ETA are real.
            if in_flight is not None:
                skipped += check_finite(*in_flight, cfg, checkpointer)  # waits for that step
                bar.update(1)
            in_flight = (step, metrics["nonfinite"])
            stopping = preemption.should_stop(setup.mesh)  # the same answer on every process

            if step % cfg.train.log_every == 0 or step == last_step:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                images_per_s = (step - tick_step) * cfg.data.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                # Over the global batch, and the bad records over every process so far.
                index_sum, seen, bad = distributed.process_sums(
                    [index_sum, batches.seen, batches.bad]
                )
                metrics.update({"images_per_s": images_per_s, "data/index_sum": index_sum})
                if peak:  # model FLOPs utilization, where the device's peak is known
                    metrics["mfu"] = flops.mfu(images_per_s, model_flops, num_devices, peak)
                if cfg.train.skip_nonfinite:  # updates skipped so far in this run
                    metrics["skipped_steps"] = skipped + int(metrics["nonfinite"])
                metrics.update(bad_records.metrics(seen, bad))
                writer.write(step, metrics, prefix="train/")
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                results.update({f"train/{k}": float(v) for k, v in metrics.items()})

            if evaluators and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                scores = evaluate(encoders, evaluators, state["params"])
                writer.write(step, scores, prefix="eval/")
                results.update({f"eval/{k}": v for k, v in scores.items()})
                message = f"step {step} eval: {_format(scores)}"
                if bar.disable:
                    logging.info(message)
                else:
                    bar.write(message)  # a log line would tear the progress bar
                tick = time.perf_counter()  # evaluation time is not training throughput

            if step % cfg.train.checkpoint_every == 0 or step == last_step or stopping:
                check_finite(step, metrics["nonfinite"], cfg, checkpointer)  # never save NaNs
                seen, bad = distributed.process_sums([batches.seen, batches.bad])
                totals = {"seen_records": seen, "bad_records": bad}
                meta = checkpoint_meta(setup, order, totals)
                checkpointer.save(step, state, config_lib.to_json(cfg), meta, force=True)
            if stopping:
                break
        if in_flight is not None:
            skipped += check_finite(*in_flight, cfg, checkpointer)
            bar.update(1)
    finally:  # also when a step or the data fails: workers stopped, saves finished
        bar.close()
        batches.close()
        checkpointer.close()  # waits for the last save to be complete on disk
        preemption.close()
        writer.close()
    if stopping:
        logging.warning(
            "Preempted at step %d: checkpoint saved; rerun the same command to resume.", step
        )
    return results


# Bookkeeping in evaluation results, left out of the one-line summary.
_COUNTS = ("chance", "chance_r1", "examples", "skipped", "images", "captions")


def _format(scores: dict[str, float]) -> str:
    shown = {k: v for k, v in scores.items() if k.rsplit("/", 1)[-1] not in _COUNTS}
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(shown.items()))
