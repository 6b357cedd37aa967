"""Chen et al. (ICLR 2024): a positive-pair regularizer, the squared loss, and temperature.

    python launch/study.py --study positive_pair

Variants of one CLIP on single-object short captions: the positive-pair term
lambda * mean(1 - cos) with lambda in {0, 0.1, 0.3, 1} (loss.positive_weight), the squared
loss on similarities (loss.kind=squared), and two fixed temperatures (loss.learn_scale=false
with model.init_logit_scale = log 10 and log 100). Measured: zero-shot, a linear probe, and
the positive/negative similarity margin on val pairs (computed here from the encoders).
"""

from __future__ import annotations

import math

from jaxclip import config as config_lib
from jaxclip.studies import common

NAME = "positive_pair"
CLAIM = (
    "Chen, Deng, Li, Gu (ICLR 2024, PAPERS.md section 3): the margin between positive and "
    "negative pairs depends on the temperature; a squared loss on similarities fails at "
    "zero-shot transfer where the contrastive loss succeeds; adding a one-sided positive-pair "
    "regularizer to the CLIP loss improves zero-shot and linear-probe results (CC3M-trained "
    "models; the exact formula and weight could not be confirmed: ours is "
    "lambda * mean_i (1 - cos(u_i, v_i)))."
)
ZERO_SHOT = "zeroshot_combo_seen/top1"
PROBE = "probe_combo/top1"
TASKS = (
    "zeroshot_combo_seen",
    "zeroshot_combo_heldout",
    "zeroshot_shape",
    "linear_probe:shapes=combo,prefix=probe_combo",
)
# Short captions are at most 8 tokens: a context of 16 halves the text tower's cost.
DATA = {
    "data.shapes.max_objects": 1,
    "data.shapes.caption_style": "short",
    "data.context_length": 16,
    "model.text.context_length": 16,
}


def variants(quick: bool) -> dict[str, dict]:
    """Run name -> overrides; those whose config keys this checkout lacks are left out."""
    weights = (0.0, 1.0) if quick else (0.0, 0.1, 0.3, 1.0)
    out = {f"lambda_{w:g}": {"loss.positive_weight": w} for w in weights}
    if "squared" in config_lib.CHOICES["loss.kind"]:
        out["squared"] = {"loss.kind": "squared"}
    if common.has_config_key("loss.learn_scale") and not quick:
        for scale in (10, 100):
            out[f"fixed_scale_{scale}"] = {
                "loss.learn_scale": False,
                "model.init_logit_scale": math.log(scale),
            }
    return out


def run(ctx: common.Context) -> common.Results:
    steps = common.steps(ctx.quick, 200)
    baseline = []
    for name, overrides in variants(ctx.quick).items():
        for run_name, offset in ctx.seeds(name, 2 if name == "lambda_0" else 1):
            ctx.train(run_name, {**DATA, **steps, **overrides}, offset)
            if name == "lambda_0":
                baseline.append(run_name)

    rows = {}
    for name, run in ctx.runs.items():
        encoders = ctx.encoders(run)
        row = dict(ctx.evaluate(run, list(TASKS), encoders))
        images, captions = common.val_pairs(run.cfg, int(run.cfg.eval.num_examples))
        row.update(
            common.similarity_margin(encoders.images(images), encoders.texts(captions), captions)
        )
        rows[name] = row
    columns = [
        ZERO_SHOT,
        "zeroshot_combo_heldout/top1",
        "zeroshot_shape/top1",
        PROBE,
        "margin/positive",
        "margin/negative",
        "margin/gap",
    ]

    lambdas = [n for n in rows if n.startswith("lambda_") and n not in baseline]
    parts = {}
    for key, label in ((ZERO_SHOT, "zero-shot"), (PROBE, "linear probe")):
        effect, noise = common.effect_and_noise(rows, baseline, lambdas, key)
        parts[f"regularizer improves {label} (mean over lambda > 0 minus lambda = 0)"] = (
            common.judge(effect, noise, f"the positive-pair term raises {key}")
        )
    _, noise = common.effect_and_noise(rows, baseline, baseline, ZERO_SHOT)
    squared = common.metric(rows, baseline, ZERO_SHOT) - rows.get("squared", {}).get(
        ZERO_SHOT, math.nan
    )
    parts["squared loss fails at zero-shot (contrastive minus squared)"] = common.judge(
        squared, noise, "the contrastive loss beats the squared loss at zero-shot"
    )
    _, gap_noise = common.effect_and_noise(rows, baseline, baseline, "margin/gap")
    gaps = [rows[n]["margin/gap"] for n in ("fixed_scale_10", "fixed_scale_100") if n in rows]
    depends = abs(gaps[0] - gaps[1]) if len(gaps) == 2 else math.nan
    parts["margin depends on temperature (|gap at scale 10 - gap at scale 100|)"] = common.judge(
        depends, gap_noise, "the positive/negative margin changes with a fixed temperature"
    )
    weights = [float(n.split("_")[1]) for n in rows if n.startswith("lambda_") and "seed" not in n]
    curve = {
        key: (weights, [common.metric(rows, [f"lambda_{w:g}"], key) for w in weights])
        for key in (ZERO_SHOT, PROBE, "margin/gap")
    }
    notes = [
        "margin/*: mean cosine of the n val images with their own caption (positive) and with "
        "every different caption (negative), and their difference, in float64.",
        "Seed noise: the two seeds of lambda_0 (the same variant, different initialization).",
    ]
    plots = [("lambda.png", "Positive-pair weight", "lambda", "value", curve)]
    return common.Results(rows, columns, common.combine_verdicts(parts), notes, plots)
