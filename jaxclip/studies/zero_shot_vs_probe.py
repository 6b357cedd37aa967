"""CLIP (2021): zero-shot vs a linear probe, and what prompt ensembling adds.

    python launch/study.py --study zero_shot_vs_probe

One CLIP on single-object short captions (the demo's data), two seeds. The same image
features are classified zero-shot with one prompt ("a photo of a {}", `templates=shapes_one`)
and with the ensemble of the training captions' four phrasings (`templates=shapes`), and by
a logistic-regression probe fitted on labelled features (`linear_probe`, L2 chosen on a val
split), for the shape and the (shape, colour) tasks.
"""

from __future__ import annotations

from jaxclip.evaluate import templates as templates_lib
from jaxclip.studies import common

NAME = "zero_shot_vs_probe"
CLAIM = (
    "Radford et al. 2021 (PAPERS.md section 1): zero-shot classification averages each "
    "class's prompt embeddings over templates, and ensembling templates gains a few points "
    "over one prompt; a linear probe (logistic regression on frozen features, L2 chosen on a "
    "validation split) uses labels, and in the paper beats zero-shot once it has more than a "
    "few labelled examples per class (this figure is not in PAPERS.md)."
)
LABELS = ("combo", "shape")
DATA = {
    "data.shapes.max_objects": 1,
    "data.shapes.caption_style": "short",
    "data.context_length": 16,
    "model.text.context_length": 16,
}


def tasks() -> tuple[str, ...]:
    out = []
    ensembles = ["shapes_one", "shapes"]
    if "shapes_unseen" in templates_lib.ENSEMBLES:  # phrasings no caption uses
        ensembles.append("shapes_unseen")
    split = {"combo": "combo_seen", "shape": "shape"}
    for label in LABELS:
        for ens in ensembles:
            out.append(f"zeroshot:shapes={split[label]},templates={ens},prefix=zs_{ens}_{label}")
        out.append(f"linear_probe:shapes={label},prefix=probe_{label}")
    return tuple(out)


TASKS = tasks()


def paired(effects: list[float]) -> tuple[float, float]:
    """(mean per-seed effect, gap between two seeds' effects; NaN with one seed)."""
    noise = abs(effects[0] - effects[1]) if len(effects) > 1 else float("nan")
    return sum(effects) / len(effects), noise


def run(ctx: common.Context) -> common.Results:
    names = []
    for name, offset in ctx.seeds("clip", 2):
        ctx.train(name, {**DATA, **common.steps(ctx.quick, 800)}, offset)
        names.append(name)
    rows = {name: dict(ctx.evaluate(run)) for name, run in ctx.runs.items()}
    columns = [
        key
        for label in LABELS
        for key in (
            f"zs_shapes_one_{label}/top1",
            f"zs_shapes_{label}/top1",
            f"zs_shapes_unseen_{label}/top1",
            f"probe_{label}/top1",
        )
        if any(key in row for row in rows.values()) or "unseen" not in key
    ]
    parts = {}
    for label in LABELS:
        one, ens, probe = (
            f"zs_shapes_one_{label}/top1",
            f"zs_shapes_{label}/top1",
            f"probe_{label}/top1",
        )
        for derived, a, b in (
            (f"ensemble_gain_{label}", ens, one),
            (f"probe_minus_zeroshot_{label}", probe, ens),
        ):
            for name in names:
                rows[name][derived] = rows[name].get(a, float("nan")) - rows[name].get(
                    b, float("nan")
                )
        gain = [rows[n][f"ensemble_gain_{label}"] for n in names]
        probe_gain = [rows[n][f"probe_minus_zeroshot_{label}"] for n in names]
        parts[f"ensembling gains over one prompt ({label})"] = common.judge(
            *paired(gain), "four templates score higher than one"
        )
        parts[f"linear probe beats zero-shot ({label})"] = common.judge(
            *paired(probe_gain), "the probe scores higher than the template ensemble"
        )
        columns += [f"ensemble_gain_{label}", f"probe_minus_zeroshot_{label}"]
    notes = [
        "Effects are paired per seed (same model, same images); seed noise is the gap between "
        "the two seeds' effects.",
        "zs_shapes_unseen_*: prompts in phrasings no training caption uses (where available).",
    ]
    methods = ["one prompt", "ensemble", "linear probe"]
    plots = [
        (
            "zero_shot_vs_probe.png",
            "Zero-shot vs linear probe",
            "method",
            "top-1",
            {
                label: (
                    methods,
                    [
                        common.metric(rows, names, k)
                        for k in (
                            f"zs_shapes_one_{label}/top1",
                            f"zs_shapes_{label}/top1",
                            f"probe_{label}/top1",
                        )
                    ],
                )
                for label in LABELS
            },
        )
    ]
    return common.Results(rows, columns, common.combine_verdicts(parts), notes, plots)
