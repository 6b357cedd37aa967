"""The shard writer shared by every source: check captions, re-encode images, write shards in
parallel, resume, report what was skipped, and write the manifest last.

Images are re-encoded once, here, so that training hosts decode small JPEGs: the chosen side
(the shorter one by default) is brought down to at most `max_side` pixels, keeping the aspect
ratio and never upscaling; EXIF rotation is applied. A JPEG that needs none of that keeps its
original bytes (no second lossy pass). Every image is decoded in full here, through the same
guarded decoder the training pipeline uses, so a shard holds only images that decode.

Resuming: each finished shard gets a small report, `conversion/<shard>.json` (counts, skips,
checksum, and the fingerprint of the inputs and options). On a rerun a shard whose file and
report both exist with the same fingerprint is kept; everything else is (re)written. A
different fingerprint in the same directory is an error, never a silent mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from jaxclip.data import records
from jaxclip.data.convert.source import SKIP_REASONS, ConversionError, Example, Skip, Source
from jaxclip.data.images import DEFAULT_MAX_PIXELS, DecompressionBombError, ImageError, decode_image

REPORTS_DIR = "conversion"
EXAMPLES_PER_REASON = 5  # skipped records named in the manifest, per reason

# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    max_side: int = 256
    resize_side: str = "shorter"  # which side max_side bounds: "shorter" or "longer"
    jpeg_quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.resize_side not in ("shorter", "longer"):
            raise ConversionError(
                f"--resize_side must be 'shorter' or 'longer', got {self.resize_side!r}"
            )
        if self.max_side < 8:
            raise ConversionError(f"--max_side must be at least 8 pixels, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def target_size(width: int, height: int, options: ImageOptions) -> tuple[int, int]:
    """(w, h) after bounding the chosen side by max_side; the input size if already small."""
    side = min(width, height) if options.resize_side == "shorter" else max(width, height)
    if side <= options.max_side:
        return width, height
    scale = options.max_side / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode_image(data: bytes, options: ImageOptions) -> bytes:
    """Image bytes -> JPEG bytes within the size bound. Raises ImageError (or its subclass
    DecompressionBombError) for anything that the training pipeline could not decode."""
    orientation, keep_original = 1, False
    try:  # header only: size, format, rotation (the guarded decode below refuses bombs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                orientation = int(header.getexif().get(0x0112, 1) or 1)
                keep_original = header.format == "JPEG" and header.mode in ("RGB", "L")
                stored = header.size
    except Exception:
        stored = None  # decode_image below raises the precise error
    upright = stored[::-1] if stored and orientation in (5, 6, 7, 8) else stored
    want = target_size(*upright, options) if upright else None
    draft = None
    if want and want != upright:
        draft = want[::-1] if orientation in (5, 6, 7, 8) else want
    image = decode_image(data, max_pixels=options.max_pixels, draft_size=draft)
    if orientation in _ORIENTATION:
        image = image.transpose(_ORIENTATION[orientation])
    size = target_size(*image.size, options)
    if keep_original and orientation == 1 and size == image.size == stored:
        return bytes(data)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=options.jpeg_quality)
    return out.getvalue()


# --- One shard ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SkipTally:
    """Counts per reason plus the first few examples of each."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, skip: Skip) -> None:
        self.counts[skip.reason] = self.counts.get(skip.reason, 0) + 1
        shown = self.examples.setdefault(skip.reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{skip.where}: {skip.detail}" if skip.detail else skip.where)

    def merge(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        for reason, count in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        for reason, shown in examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: EXAMPLES_PER_REASON - len(mine)])


def _encode(item: Example | Skip, has_text: bool, options: ImageOptions) -> bytes | Skip:
    """The encoded record, or why it is skipped."""
    if isinstance(item, Skip):
        return item
    captions = [c.strip() for c in item.captions if c and c.strip()]
    if has_text and not captions:
        return Skip("empty_caption", item.key)
    try:
        image = reencode_image(item.image, options)
    except DecompressionBombError as e:
        return Skip("decompression_bomb", item.key, str(e))
    except ImageError as e:
        return Skip("undecodable_image", item.key, str(e))
    except Exception as e:  # an unexpected decoder failure must not end a long conversion
        return Skip("undecodable_image", item.key, f"{type(e).__name__}: {e}")
    return records.encode_record(item.key, image, captions, item.label)


def convert_shard(job: dict) -> dict:
    """Writes one shard from one task (runs in a worker); returns its report."""
    source: Source = job["source"]
    tally, seen = SkipTally(), 0

    def encoded() -> Iterable[bytes]:
        nonlocal seen
        for item in source.read(job["task"]):
            if isinstance(item, Example) or item.reason != "truncated_tar":
                seen += 1  # input records; a damaged tar is not one
            out = _encode(item, source.has_text, job["options"])
            if isinstance(out, Skip):
                tally.add(out)
            else:
                yield out

    path = Path(job["path"])
    info = records.write_shard(path, encoded())
    report = {
        **dataclasses.asdict(info),
        "size": path.stat().st_size,
        "seen": seen,
        "fingerprint": job["fingerprint"],
        "skipped": tally.counts,
        "skipped_examples": tally.examples,
    }
    _write_json(Path(job["report"]), report)
    return report


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _finished_report(path: Path, report_path: Path, fingerprint: str) -> dict | None:
    """The report of a shard finished by an earlier run with the same inputs, else None."""
    if not (path.is_file() and report_path.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError:
        return None
    if report.get("fingerprint") != fingerprint or report.get("size") != path.stat().st_size:
        return None
    return report


# --- A whole dataset ---------------------------------------------------------------------------


def safe_prefix(text: str) -> str:
    """A file-name-safe shard prefix ("coco_captions/2017" -> "coco_captions_2017")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "data"


def convert(
    source: Source,
    output: str | os.PathLike,
    *,
    name: str,
    prefix: str | None = None,
    options: ImageOptions = ImageOptions(),
    num_shards: int = 0,
    records_per_shard: int = 10_000,
    workers: int = 1,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Converts `source` into a jaxclip records dataset in `output`; returns the manifest.

    Shard files are named `<prefix>-00000-of-0000N.array_record` (prefix: `name`). Rerunning
    the same command resumes: finished shards are kept, the others written.
    """
    output = Path(output)
    tasks = source.plan(num_shards, records_per_shard)
    prefix = safe_prefix(prefix or name)
    files = [records.shard_name(prefix, i, len(tasks)) for i in range(len(tasks))]
    description = {
        "source": source.describe(),
        "image": dataclasses.asdict(options),
        "shards": len(tasks),
        "prefix": prefix,
    }
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    _check_output(output, files, fingerprint)
    (output / REPORTS_DIR).mkdir(parents=True, exist_ok=True)

    reports, jobs = {}, []
    for task, file in zip(tasks, files, strict=True):
        report_path = output / REPORTS_DIR / f"{file}.json"
        done = _finished_report(output / file, report_path, fingerprint)
        if done is not None:
            reports[file] = done
        else:
            jobs.append(
                dict(
                    source=source,
                    task=task,
                    path=str(output / file),
                    report=str(report_path),
                    options=options,
                    fingerprint=fingerprint,
                )
            )
    bar = tqdm(
        total=len(tasks),
        initial=len(reports),
        unit="shard",
        desc=f"converting {name}",
        disable=not progress,
    )
    with bar:
        for report in _run(jobs, workers):
            reports[report["file"]] = report
            bar.update(1)
            bar.set_postfix(
                records=sum(r["count"] for r in reports.values()),
                skipped=sum(sum(r["skipped"].values()) for r in reports.values()),
            )

    tally = SkipTally()
    for file in files:
        tally.merge(reports[file]["skipped"], reports[file]["skipped_examples"])
    shards = [
        records.ShardInfo(file=f, count=reports[f]["count"], sha256=reports[f]["sha256"])
        for f in files
    ]
    if sum(s.count for s in shards) == 0:
        raise ConversionError(
            f"No usable record in the input: every record was skipped.\n{skip_report(tally)}"
        )
    return records.write_manifest(
        output,
        shards,
        name=name,
        label_names=source.label_names,
        extra={
            **(extra or {}),
            "source": description["source"],
            "image": description["image"],
            "conversion_fingerprint": fingerprint,
            "input_records": sum(r["seen"] for r in reports.values()),
            "skipped": {reason: tally.counts.get(reason, 0) for reason in SKIP_REASONS},
            "skipped_examples": tally.examples,
        },
    )


def _run(jobs: list[dict], workers: int):
    """Yields shard reports as shards finish: in this process, or in a pool of `workers`."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield convert_shard(job)
        return
    # spawn, not fork: the parent may hold threads (TFDS, array_record, JAX in tests).
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(convert_shard, jobs)


def _check_output(output: Path, files: list[str], fingerprint: str) -> None:
    """Refuses an output directory that holds a different conversion."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} exists and is not a directory")
    if not output.is_dir():
        return
    stale = sorted(p.name for p in output.glob("*.array_record") if p.name not in set(files))
    manifest = output / records.MANIFEST
    old = None
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text()).get("conversion_fingerprint")
        except json.JSONDecodeError:
            old = None
    if stale or (old is not None and old != fingerprint):
        what = f"shards from another conversion (e.g. {stale[0]})" if stale else "a manifest"
        raise ConversionError(
            f"--output {output} already holds {what} made from different inputs or options "
            f"(source, --max_side, --num_shards, ...). Write to a new --output directory, or "
            f"delete {output} to start over."
        )


def skip_report(tally_or_manifest) -> str:
    """Human-readable skip report (from a SkipTally or a manifest)."""
    if isinstance(tally_or_manifest, SkipTally):
        counts, examples = tally_or_manifest.counts, tally_or_manifest.examples
    else:
        counts = tally_or_manifest.get("skipped", {})
        examples = tally_or_manifest.get("skipped_examples", {})
    lines = []
    for reason, meaning in SKIP_REASONS.items():
        if counts.get(reason):
            lines.append(f"  {reason}: {counts[reason]}  ({meaning})")
            lines.extend(f"      e.g. {e}" for e in examples.get(reason, []))
    return "skipped:\n" + "\n".join(lines) if lines else "skipped: nothing"
