"""TFDS evaluation sets: a prepared dataset read with `data_source` (ArrayRecord, no
TensorFlow), images left encoded until a batch is decoded."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from jaxclip.data.convert.tfds_source import texts, value_at
from jaxclip.evaluate.datasets import _TEXT_FIELDS, DEFAULT_SPLITS, EvalDataError, EvalSet, TaskSpec


def _tfds_hint(name: str, data_dir: str) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"Prepare it once, in ArrayRecord format (TFDS needs TensorFlow for this step only; "
        f"ImageNet also needs its manually downloaded archives, see --manual_dir):\n"
        f"    pip install tensorflow && tfds build {name}{where} --file_format=array_record\n"
        f"then point --config.eval.data_dir at that directory. Or convert it to jaxclip records "
        f"with launch/prepare_data.py and use 'records=DIR' in the task."
    )


def tfds_split(name: str, data_dir: str, split: str | None, features: Sequence[str]):
    """(builder, data source, split name) of a prepared TFDS split, images left encoded."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError (its text lists every TFDS dataset) and kin
        known = tfds.core.registered.list_imported_builders()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        where = data_dir or "the default TFDS data dir"
        raise EvalDataError(
            f"TFDS knows no dataset {name!r} and none is prepared under {where} "
            f"({type(e).__name__}).{hint}\n{_tfds_hint(name, data_dir)}"
        ) from e
    splits = list(builder.info.splits)
    if not splits:
        raise EvalDataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}.\n"
            f"{_tfds_hint(name, data_dir)}"
        )
    if split is None:
        split = next((s for s in DEFAULT_SPLITS if s in splits), None)
        if split is None:
            raise EvalDataError(
                f"TFDS dataset {name!r} has no test or validation split; name one with "
                f"',split=...' (it has {', '.join(splits)})."
            )
    elif split.split("[")[0] not in splits:
        raise EvalDataError(f"TFDS dataset {name!r} has no split {split!r}; it has {splits}.")
    missing = [f for f in features if f.split("/")[0] not in builder.info.features]
    if missing:
        raise EvalDataError(
            f"TFDS dataset {name!r} has no feature {missing[0]!r}; its features are "
            f"{', '.join(builder.info.features)}. Name the right one in the task options."
        )
    image_feature = features[0]
    try:
        source = builder.as_data_source(
            split=split, decoders={image_feature: tfds.decode.SkipDecoding()}
        )
    except NotImplementedError as e:
        raise EvalDataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is not stored as ArrayRecord, which "
            f"jaxclip reads without TensorFlow ({e}). Convert it once:\n"
            f"    tfds convert_format --dataset_dir={builder.data_dir} "
            f"--out_file_format=array_record"
        ) from e
    return builder, source, split


class TfdsSet(EvalSet):
    def __init__(self, spec: TaskSpec, data_dir: str, *, labelled: bool):
        self.name = spec.name
        self.image_field = spec.options.get("image", "image")
        self.label_field = spec.options.get("label", "label") if labelled else None
        features = [self.image_field] + ([self.label_field] if labelled else [])
        self.builder, self.source, self.split = tfds_split(
            spec.location, data_dir, spec.options.get("split"), features
        )
        if labelled:
            feature = self.builder.info.features[self.label_field]
            names = getattr(feature, "names", None)
            if not names:
                raise EvalDataError(
                    f"TFDS feature {spec.location}/{self.label_field} is not a ClassLabel with "
                    f"names; name the label feature with ',label=...'."
                )
            self.label_names = list(names)
            self.text_field = None
        else:
            self.text_field = spec.options.get("text") or next(
                (f for f in _TEXT_FIELDS if self._has_field(f)), None
            )
            if self.text_field is None or not self._has_field(self.text_field):
                raise EvalDataError(
                    f"TFDS dataset {spec.location!r} has no caption feature (looked for "
                    f"{', '.join(_TEXT_FIELDS)}); name it with ',text=...'."
                )

    def _has_field(self, path: str) -> bool:
        node = self.builder.info.features
        for part in path.split("/"):
            feature = getattr(node, "feature", node)  # look inside a Sequence
            try:
                node = feature[part]
            except (KeyError, TypeError):
                return False
        return True

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> dict:
        try:
            example = self.source[int(index)]
            item = {"image": bytes(value_at(example, self.image_field))}
            if self.label_field is not None:
                item["label"] = int(value_at(example, self.label_field))
            else:
                item["captions"] = texts(value_at(example, self.text_field))
        except Exception as e:
            return {"error": f"cannot read example {index}: {type(e).__name__}: {e}"}
        return item
