"""launch/benchmark.py's conversion and embedder measurements, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP = ROOT / "tests" / "fixtures" / "clip_open_clip_tiny" / "open_clip_config.json"
TINY_QWEN3 = ROOT / "tests" / "fixtures" / "decoder_llm" / "qwen3"


def benchmark(*flags: str) -> dict:
    return launch("launch/benchmark.py", *flags)


def launch(script: str, *flags: str) -> dict:
    """Runs a launch script on one CPU device; its last stdout line, parsed as JSON."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device
    out = subprocess.run(
        [sys.executable, script, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_weights_times_an_import_and_both_exports_and_cleans_up(tmp_path):
    scratch = tmp_path / "scratch"
    result = benchmark(
        "--what=weights", f"--weights_models={TINY_CLIP}", f"--weights_dir={scratch}"
    )
    (row,) = result["rows"]
    assert row["model"] == str(TINY_CLIP)
    assert all(row[k] > 0 for k in ("import_s", "export_open_clip_s", "export_hf_s"))
    # 2 towers of 2 layers at width 32 plus a 512 x 32 token table: tens of thousands of
    # float32 parameters, a few hundred KB.
    assert 0.1 < row["file_mb"] < 1.0
    assert not scratch.exists()


def test_embed_reports_compiled_flops_close_to_the_analytic_count():
    result = benchmark(
        "--what=embed", f"--embed_encoder={TINY_QWEN3}", "--embed_lengths=8,16",
        "--embed_batch=2", "--embed_batches=1",
    )  # fmt: skip
    assert result["batch_size"] == 2 and result["dtype"] == "float32"
    assert [r["length"] for r in result["rows"]] == [8, 16]
    for row in result["rows"]:
        assert row["captions_per_s"] > 0
        # XLA's count adds norms, rope and pooling to the matmuls: a few percent more.
        analytic = row["with_attention_gflop_per_caption"]
        assert analytic <= row["compiled_gflop_per_caption"] < 1.1 * analytic


def test_an_unknown_measurement_is_refused_with_the_choices():
    out = subprocess.run(
        [sys.executable, "launch/benchmark.py", "--what=weight"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert out.returncode != 0
    assert "unknown --what weight" in out.stderr and "weights" in out.stderr


def test_open_clip_step_comparison_runs_both_frameworks_and_reports_their_ratio():
    from reference_libs import require_reference

    require_reference()
    summary = launch(
        "launch/compare_open_clip_step.py",
        f"--open_clip_python={sys.executable}",
        *("--threads=1", "--rounds=2", "--steps=1"),
    )
    assert summary["jaxclip_s_per_step"] > 0 and summary["open_clip_s_per_step"] > 0
    ratio = summary["jaxclip_over_open_clip"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert summary["threads"] == 1 and summary["rounds"] == 2
