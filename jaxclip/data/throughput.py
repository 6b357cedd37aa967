"""Input-pipeline throughput on JPEG records, against a bare decode-and-crop loop.

`launch/benchmark.py --what=pipeline` uses these: it writes a few thousand 256-px JPEG records,
times a plain loop that only decodes and crops them with PIL (the floor any pipeline pays),
then the real training pipeline (`pipeline.train_loader`) with 1 and 2 worker processes
making CLIP batches (tokenized captions) and with 1 worker making LIFT batches (each
caption's row from a caption-embedding store, 4096-d like NV-Embed-v2's), in one run, so
the ratios compare like with like on whatever load the machine has. It also times the
store lookup alone.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from PIL import Image

from jaxclip import config as config_lib
from jaxclip.data import embedding_store, images, pipeline, records, shapes
from jaxclip.data.sources import RecordsExamples
from jaxclip.data.transforms import normalize_images

# Shorter side 256, as launch/prepare_data.py writes by default (--max_side 256, shorter side):
# square, landscape 4:3 and portrait 3:4.
_SHAPES = ((256, 256), (341, 256), (256, 341))
LIFT_DIM = 4096  # NV-Embed-v2's dimension (vit_b16_lift): the largest row a LIFT batch reads


def write_jpeg_records(
    directory: str | Path, count: int, distinct: int = 384, seed: int = 0
) -> Path:
    """`count` records cycling through `distinct` shapes-world scenes, shorter side 256,
    sensor-like noise, JPEG q95 (the converter's default quality).

    The noise gives the JPEGs the size and decode cost of photographs (flat synthetic
    scenes would compress to a few KB and decode unrealistically fast). `count` sets the
    dataset's length, which the data order's cost depends on (grain's index shuffle walks
    cycles: about 45 us a lookup over 384 records, 3 us over 100,000); the images repeat so
    that writing a realistic length stays quick.
    """
    distinct = min(distinct, count)
    world = shapes.ShapesWorld(split="train", num_examples=distinct, image_size=341, seed=seed)
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(distinct):
        example = world[i]
        width, height = _SHAPES[i % len(_SHAPES)]
        noisy = example["image"].astype(np.float32) + rng.normal(0, 8, (341, 341, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)[:height, :width])
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        scenes.append((example["key"], buffer.getvalue(), example["caption"]))
    encoded = []
    for i in range(count):
        key, jpeg, caption = scenes[i % distinct]
        encoded.append(records.encode_record(f"{key}-{i // distinct}", jpeg, [caption]))
    records.write_dataset(directory, encoded, name="jpeg256", num_shards=4)
    return Path(directory)


def _pin(pid: int, cores: set[int]) -> None:
    """Every thread of process `pid` (0: this one) onto `cores` (Linux; XLA's and grain's
    threads exist already, and a process-wide call would move only one of them)."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.exists() else [pid]:
        with contextlib.suppress(OSError):  # a thread that has just ended
            os.sched_setaffinity(tid, cores)


def write_store(store_dir: str | Path, source, dim: int) -> embedding_store.DatasetEmbeddings:
    """A caption-embedding store of `source` in the real format; the rows are seeded random
    unit vectors (lookup cost depends on the layout, not on which encoder made them)."""
    rng = np.random.default_rng(0)

    def embed(texts):
        rows = rng.standard_normal((len(texts), dim)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=-1, keepdims=True)

    encoder = {"name": "random-rows", "dim": dim, "max_length": 77}
    embedding_store.build_dataset(
        store_dir, source, embed_fn=embed, encoder=encoder, shard_size=0, progress=False
    )
    return embedding_store.DatasetEmbeddings.open(store_dir, source.identity, encoder, "")


def lookup_microseconds(store: embedding_store.DatasetEmbeddings, source, count: int) -> float:
    """Wall time of one `lookup` (record, caption), random records, warm page cache."""
    rng = np.random.default_rng(1)
    picks = [(int(r), source.captions(int(r))) for r in rng.integers(0, len(source), 64)]
    for record, captions in picks:  # map the shards, warm the cache
        store.lookup(record, 0, len(captions))
    start = time.perf_counter()
    for k in range(count):
        record, captions = picks[k % len(picks)]
        store.lookup(record, k % len(captions), len(captions))
    return 1e6 * (time.perf_counter() - start) / count


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by these processes; Linux /proc, else 0."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bare_decode_crop(directory: str | Path, size: int, crop_scale, crop_ratio) -> dict:
    """A loop over every record: read, unpack, PIL decode, random crop resized to `size`.

    Runs on one core, as one pipeline worker does. Returns images/s (wall clock) and CPU
    milliseconds per image (robust to a busy machine).
    """
    cores = os.sched_getaffinity(0)
    _pin(0, {min(cores)})
    source = records.RecordsSource(directory)
    rng = np.random.default_rng(0)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(len(source)):
        record = records.decode_record(source[i]["raw"])
        image = Image.open(io.BytesIO(record["image"])).convert("RGB")
        left, top, w, h = images.random_resized_crop_box(*image.size, rng, crop_scale, crop_ratio)
        box = (left, top, left + w, top + h)
        np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
    count = len(source)
    result = {
        "images_per_s": count / (time.perf_counter() - start),
        "cpu_ms_per_image": 1000 * (time.process_time() - cpu) / count,
    }
    _pin(0, cores)
    return result


def pipeline_throughput(
    data_cfg: ml_collections.ConfigDict,
    workers: int,
    batch_size: int,
    batches: int,
    caption_features: pipeline.CaptionFeatures | None = None,
) -> dict:
    """The training pipeline in steady state, batches normalized as the train step does (on
    JAX's default device: the accelerator in training, the CPU here).

    Untimed first: worker start-up and every batch the workers could have buffered
    meanwhile, so the timed batches are produced while they are waited for. Returns
    images/s and CPU milliseconds per image, in the workers and in the main process.
    `caption_features` defaults to tokenized captions (CLIP batches).
    """
    data_cfg = config_lib.from_dict(data_cfg.to_dict())
    with data_cfg.unlocked():
        data_cfg.worker_count = workers
    features = caption_features or pipeline.TokenizedCaption(pipeline.make_tokenizer(data_cfg))
    loader = pipeline.train_loader(data_cfg, features, batch_size, process_index=0, process_count=1)
    normalize = jax.jit(normalize_images)
    image_shape = (batch_size, data_cfg.image_size, data_cfg.image_size, 3)
    jax.block_until_ready(normalize(np.zeros(image_shape, np.uint8)))  # compile first
    iterator = loader
    for _ in range(1 + max(workers, 1) * data_cfg.prefetch):
        jax.block_until_ready(normalize(next(iterator)["image"]))
    pids = [p.pid for p in multiprocessing.active_children()]
    cores = sorted(os.sched_getaffinity(0))
    pinned = len(pids) == workers and 1 + workers <= len(cores)
    if pinned:  # a core each: the main process's work does not slow a worker down
        _pin(0, {cores[0]})
        for k, pid in enumerate(pids):
            _pin(pid, {cores[1 + k]})
    start, cpu, cpu_workers = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    for _ in range(batches):
        jax.block_until_ready(normalize(next(iterator)["image"]))
    seconds = time.perf_counter() - start
    count = batches * batch_size
    result = {
        "images_per_s": count / seconds,
        "worker_cpu_ms_per_image": 1000 * (_cpu_seconds(pids) - cpu_workers) / count,
        "main_cpu_ms_per_image": 1000 * (time.process_time() - cpu) / count,
        "pinned": float(pinned),
    }
    iterator.close()
    _pin(0, set(cores))
    return result


def compare(
    data_cfg: ml_collections.ConfigDict,
    *,
    count: int = 4096,
    batch_size: int = 32,
    batches: int = 10,
    repeats: int = 3,
) -> dict:
    """Bare loop vs pipeline (CLIP batches with 1 and 2 workers, LIFT batches with 1),
    `repeats` interleaved rounds; medians.

    Each pipeline worker decodes in one thread (data.read_threads=0), so images/s
    per worker compares with the single-threaded bare loop; where the machine has a core
    for each, the bare loop, the main process and every worker run on a core of their own
    (`pinned` in the results). Wall-clock rates swing with the
    machine's load; CPU time per image does much less, so both are reported.
    """
    data_cfg = config_lib.from_dict(data_cfg.to_dict())
    rounds, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_jpeg_records(Path(tmp) / "jpeg256", count)
        record_bytes = sum(f.stat().st_size for f in directory.glob("*.array_record")) / count
        with data_cfg.unlocked():
            data_cfg.source = "records"
            data_cfg.records.paths = str(directory)
            data_cfg.read_threads = 0
            data_cfg.image_size = 224
        augment = data_cfg.augment
        source = RecordsExamples(str(directory), max_pixels=10**9, draft_side=224)
        store = write_store(Path(tmp) / "store", source, LIFT_DIM)
        lift = pipeline.StoredCaptionEmbedding([store])
        for _ in range(repeats):
            bare = bare_decode_crop(directory, 224, augment.crop_scale, augment.crop_ratio)
            one = pipeline_throughput(data_cfg, 1, batch_size, batches)
            two = pipeline_throughput(data_cfg, 2, batch_size, batches)
            lift_one = pipeline_throughput(data_cfg, 1, batch_size, batches, lift)
            rounds.append(
                {
                    "bare_images_per_s": bare["images_per_s"],
                    "bare_cpu_ms_per_image": bare["cpu_ms_per_image"],
                    **{f"1_worker_{k}": v for k, v in one.items()},
                    **{f"2_workers_{k}": v for k, v in two.items()},
                    **{f"lift_1_worker_{k}": v for k, v in lift_one.items()},
                    "store_lookup_us": lookup_microseconds(store, source, 20_000),
                }
            )
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {
        "records": count,
        "mean_record_bytes": round(record_bytes),
        "image_size": 224,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        **{k: round(v, 2) for k, v in median.items()},
        "pipeline_over_bare_images_per_s": median["1_worker_images_per_s"]
        / median["bare_images_per_s"],
        "pipeline_over_bare_cpu_per_image": (
            median["1_worker_worker_cpu_ms_per_image"] + median["1_worker_main_cpu_ms_per_image"]
        )
        / median["bare_cpu_ms_per_image"],
        "scaling_2_over_1_workers": median["2_workers_images_per_s"]
        / median["1_worker_images_per_s"],
        "lift_over_clip_images_per_s": median["lift_1_worker_images_per_s"]
        / median["1_worker_images_per_s"],
        "rounds": [{k: round(v, 2) for k, v in r.items()} for r in rounds],
    }
