"""Dense probes: a 1x1 linear head on the image tower's FROZEN patch features.

Each patch token (`Encoders.patch_tokens`: the ViT's last token states after ln_post, class
token dropped) is one example; the target is the patch's share of a per-pixel map, so
everything is measured at PATCH resolution (a 64 px image with 8 px patches: an 8x8 grid).

    dense_seg    class of a patch = the majority label of its pixels (ignored pixels left
                 out; ties: the lower class id); head: multinomial logistic regression
                 (`linear_probe.fit_logistic`, L2 `SEG_L2`, at most `SEG_ITERS` L-BFGS steps).
                 Metrics: miou (mean IoU over the classes present in the held-out patches),
                 pixel_acc (fraction of held-out patches right).
    dense_depth  target = the patch's mean depth over valid pixels; head: ridge regression
                 solved in closed form (float64, L2 `DEPTH_L2` on the mean squared error).
                 Metrics: rmse, and rmse_mean_baseline (predicting the training mean).

Data (dense_folder.py): `shapes=val` (multi-object scenes, up to 3 objects; fit on the
train split, score on val; mask 0 = background, shape + 1) or `folder=DIR` (DIR/images/X
with DIR/labels/X.png or DIR/depth/X.png, split by a fixed permutation).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from jaxclip.evaluate import datasets
from jaxclip.evaluate import dense_folder as folder_lib
from jaxclip.evaluate.linear_probe import fit_logistic
from jaxclip.evaluate.registry import register_family

SEG_L2 = 1e-4
SEG_ITERS = 300
DEPTH_L2 = 1e-4
OPTIONS = ("n", "name", "prefix", "train_fraction", "depth_scale")


# --- Per-pixel maps -> per-patch targets ------------------------------------------------------


def patch_blocks(maps: np.ndarray, grid: int) -> np.ndarray:
    """(N, S, S) -> (N, grid*grid, (S/grid)^2): each patch's pixels, in patchify's order."""
    n, s, _ = maps.shape
    p = s // grid
    if p * grid != s:
        raise ValueError(f"map side {s} is not a multiple of the patch grid {grid}")
    blocks = maps.reshape(n, grid, p, grid, p).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, grid * grid, p * p)


def patch_majority(labels: np.ndarray, grid: int, num_classes: int) -> np.ndarray:
    """Integer (N, S, S) maps, values outside [0, num_classes) ignored -> (N, grid*grid)
    majority class per patch, -1 where no pixel is labelled (ties: the lower class)."""
    blocks = patch_blocks(labels.astype(np.int64), grid)
    counts = np.stack([(blocks == c).sum(-1) for c in range(num_classes)], axis=-1)
    return np.where(counts.sum(-1) > 0, counts.argmax(-1), -1)


def patch_mean(depth: np.ndarray, grid: int) -> np.ndarray:
    """Float (N, S, S) maps, NaN = invalid -> (N, grid*grid) mean of the valid pixels per
    patch, NaN where none is valid."""
    blocks = patch_blocks(depth.astype(np.float64), grid)
    valid = np.isfinite(blocks)
    count = valid.sum(-1)
    total = np.where(valid, blocks, 0.0).sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# --- Probes on arrays -------------------------------------------------------------------------


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """(mean IoU over the classes present in `truth`, how many classes that is)."""
    present = np.unique(truth)
    ious = [
        np.sum((pred == c) & (truth == c)) / np.sum((pred == c) | (truth == c)) for c in present
    ]
    return float(np.mean(ious)), len(present)


def seg_probe(train_x, train_y, test_x, test_y, num_classes: int) -> dict[str, float]:
    """Patch features (M, D) and classes (M,) (-1 = ignore) -> miou, pixel_acc, classes."""
    keep, held = train_y >= 0, test_y >= 0
    if not keep.any() or not held.any():
        raise datasets.EvalDataError("dense_seg: no labelled patch in the train or test images.")
    model = fit_logistic(
        train_x[keep], train_y[keep], SEG_L2, num_classes=num_classes, max_iter=SEG_ITERS
    )
    pred, truth = model.predict(test_x[held]), test_y[held]
    miou, classes = mean_iou(pred, truth)
    return {"miou": miou, "pixel_acc": float(np.mean(pred == truth)), "classes": float(classes)}


def fit_ridge(features: np.ndarray, targets: np.ndarray, l2: float = DEPTH_L2) -> np.ndarray:
    """Weights (D + 1,) (bias last) minimizing mean squared error + l2 * ||w||^2 (no bias
    penalty), in float64."""
    x = np.concatenate([features.astype(np.float64), np.ones((len(features), 1))], axis=1)
    gram = x.T @ x / len(x)
    penalty = l2 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(gram + penalty, x.T @ targets.astype(np.float64) / len(x))


def depth_probe(train_x, train_y, test_x, test_y) -> dict[str, float]:
    """Patch features (M, D) and depths (M,) (NaN = no valid pixel) -> rmse and the rmse of
    predicting the training mean."""
    keep, held = np.isfinite(train_y), np.isfinite(test_y)
    if not keep.any() or not held.any():
        raise datasets.EvalDataError("dense_depth: no valid depth in the train or test images.")
    w = fit_ridge(train_x[keep], train_y[keep])
    pred = test_x[held].astype(np.float64) @ w[:-1] + w[-1]
    truth = test_y[held]
    return {
        "rmse": float(np.sqrt(np.mean((pred - truth) ** 2))),
        "rmse_mean_baseline": float(np.sqrt(np.mean((train_y[keep].mean() - truth) ** 2))),
    }


def _labels_in(*maps: np.ndarray) -> int:
    """Classes 0..max label (IGNORE left out) of a folder's label maps."""
    labelled = [m[m != folder_lib.IGNORE] for m in maps]
    top = max((int(m.max()) for m in labelled if m.size), default=-1)
    if top < 0:
        raise datasets.EvalDataError("dense_seg: every label pixel is 255 (ignore).")
    return top + 1


# --- The evaluators ---------------------------------------------------------------------------


class DenseProbe:
    target = ""  # "seg" | "depth"

    def __init__(self, cfg, task: str):
        self.spec = datasets.parse_task(task, OPTIONS)
        self.train, self.test = folder_lib.open_dense_splits(cfg, self.spec, self.target)
        self.prefix = self.spec.prefix()

    def texts(self) -> list[str]:
        return []  # images only

    def _patches(self, encoders, split) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(features (N*P, width), maps (N, S, S), grid, skipped) of a split's images."""
        images, maps, errors = split.load()
        if errors:
            logging.warning(
                "%s: skipped %d images, e.g. %s", self.spec.text, len(errors), errors[0]
            )
        if not len(images):
            raise datasets.EvalDataError(f"{self.spec.text}: no readable image ({errors[0]}).")
        tokens = encoders.patch_tokens(images)
        grid = int(round(np.sqrt(tokens.shape[1])))
        return tokens.reshape(-1, tokens.shape[-1]), maps, grid, len(errors)

    def run(self, encoders) -> dict[str, float]:
        train_x, train_maps, grid, skipped_train = self._patches(encoders, self.train)
        test_x, test_maps, _, skipped_test = self._patches(encoders, self.test)
        if self.target == "seg":
            classes = self.train.num_classes or _labels_in(train_maps, test_maps)
            train_y = patch_majority(train_maps, grid, classes).reshape(-1)
            test_y = patch_majority(test_maps, grid, classes).reshape(-1)
            scores = seg_probe(train_x, train_y, test_x, test_y, classes)
        else:
            train_y = patch_mean(train_maps, grid).reshape(-1)
            test_y = patch_mean(test_maps, grid).reshape(-1)
            scores = depth_probe(train_x, train_y, test_x, test_y)
        scores["patches"] = float(
            np.sum(test_y >= 0 if self.target == "seg" else np.isfinite(test_y))
        )
        scores["images"] = float(len(test_maps))
        scores["skipped"] = float(skipped_train + skipped_test)
        return {f"{self.prefix}/{k}": v for k, v in scores.items()}


@register_family("dense_seg")
class DenseSegmentation(DenseProbe):
    target = "seg"


@register_family("dense_depth")
class DenseDepth(DenseProbe):
    target = "depth"
