"""Chen et al. (2023): is a CLIP-trained text tower more visually grounded than a BERT one?

    python launch/study.py --study text_grounding

One CLIP trained on multi-object scenes with mixed captions. Its own text tower and frozen
all-MiniLM-L6-v2 (BERT-style, the encoder configs/demo_lift.py uses) embed the same captions;
both are probed against the SAME image features (the CLIP's image tower): same-image AUC
(does caption-caption cosine say whether two captions describe one image) and the R@1 of a
ridge-fitted linear map from text embeddings to image embeddings (`grounding`). No LLM
embedder is installed (text_encoder.path would name one); it is not measured.
"""

from __future__ import annotations

from jaxclip import frozen_encoder
from jaxclip.studies import common

NAME = "text_grounding"
CLAIM = (
    "Chen et al. (Findings of ACL 2023, PAPERS.md section 5): CLIP-style text encoders lose "
    "to BERT-style ones on GLUE but are better at vision-centric text understanding: their "
    "caption-caption cosine tracks whether two captions describe the same image, and a "
    "learned linear map from their embeddings drives an image decoder better than BERT's."
)
AUC, R1 = "grounding/same_image_auc", "grounding/map_r1"
TASKS = ("grounding",)
DATA = {"data.shapes.max_objects": 3, "data.shapes.caption_style": "mixed"}
STEPS = 800


def run(ctx: common.Context) -> common.Results:
    for name, offset in ctx.seeds("clip", 2):
        ctx.train(name, {**DATA, **common.steps(ctx.quick, STEPS)}, offset)
    minilm = None
    rows, groups = {}, {"clip": [], "minilm": []}
    for name, run in list(ctx.runs.items()):
        rows[name] = dict(ctx.evaluate(run))
        groups["clip"].append(name)
        if minilm is None:  # frozen: one encoder for every image tower
            minilm = frozen_encoder.load(run.cfg.text_encoder)
        other = name.replace("clip", "minilm")
        rows[other] = ctx.evaluate(run, list(TASKS), ctx.encoders(run, minilm.embed))
        groups["minilm"].append(other)
    columns = [AUC, R1, "grounding/map_r5", "grounding/chance_r1"]
    parts = {}
    for key, label in ((AUC, "same-image AUC"), (R1, "linear-map R@1")):
        effect, noise = common.effect_and_noise(rows, groups["minilm"], groups["clip"], key)
        parts[f"CLIP text tower beats MiniLM on {label} (CLIP - MiniLM)"] = common.judge(
            effect, noise, f"the CLIP-trained text tower scores a higher {label}"
        )
    notes = [
        "Rows `minilm*` embed the captions with frozen all-MiniLM-L6-v2 and use the image "
        "features of the CLIP run of the same seed; rows `clip*` use that run's own text tower.",
        "Seed noise: the larger gap between the two seeds of either encoder.",
        "LLM text encoder: none is installed here, so none is measured.",
    ]
    order = ["clip", "minilm"]
    plots = [
        (
            "grounding.png",
            "Visual grounding of text encoders",
            "text encoder",
            "value",
            {
                label: (order, [common.metric(rows, groups[g], key) for g in order])
                for key, label in ((AUC, "same-image AUC"), (R1, "map R@1"))
            },
        )
    ]
    return common.Results(rows, columns, common.combine_verdicts(parts), notes, plots)
