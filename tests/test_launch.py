"""The launchers as a user runs them: dry run sizes, config errors, eval of a workdir."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as on a laptop
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_dry_run_reports_the_paper_parameter_count():
    out = run("launch/train.py", "--config", "vit_b16_clip", "--dry_run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "149,620,737" in out.stdout
    assert "86,192,640" in out.stdout and "63,428,096" in out.stdout
    assert "opt state" in out.stdout and "mesh: data=1" in out.stdout


def test_unknown_config_key_fails_naming_the_nearest_keys():
    out = run("launch/train.py", "--config", "demo", "--config.optim.learning_rate=1e-3")
    assert out.returncode != 0
    assert "Unknown config key 'optim.learning_rate'" in out.stderr
    assert "optim.lr" in out.stderr or "optim.end_lr_fraction" in out.stderr


def test_eval_of_an_empty_workdir_says_to_train_first(tmp_path):
    out = run("launch/eval.py", "--workdir", str(tmp_path))
    assert out.returncode != 0
    assert "No checkpoint" in out.stderr and "launch/train.py" in out.stderr


def test_vit_b16_lift_without_its_store_stops_with_the_embed_command(tmp_path):
    store = tmp_path / "no_store"
    out = run(
        "launch/train.py",
        "--config",
        "vit_b16_lift",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.text_encoder.store_dir={store}",
    )
    assert out.returncode != 0
    assert f"python launch/embed_text.py --config vit_b16_lift --store_dir {store}" in out.stderr
    assert "NV-Embed-v2" in out.stderr
