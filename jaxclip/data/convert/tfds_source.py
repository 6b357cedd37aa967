"""Any prepared TFDS dataset with an image and a text or label feature, read without TensorFlow.

`tfds.builder(name, data_dir=...)` gives the metadata (features, splits, class names);
`builder.as_data_source(split)` reads records at random from the `array_record` files, and the
image feature is read as its stored PNG/JPEG bytes (`SkipDecoding`), which the writer decodes
and re-encodes like any other image. Nothing here downloads or prepares a dataset: a dataset
must already be prepared in the array_record file format (`tfds build NAME
--file_format=array_record`, which needs TensorFlow for most datasets; reading does not).

Feature names are paths into the features: `captions/text` is the text of each caption in
TFDS's coco_captions. With no `text_feature`/`label_feature` given, the common names are
tried (`captions/text`, `captions`, `caption`, `text`; `label`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from jaxclip.data.convert.source import ConversionError, Example, Skip, split_evenly

TEXT_CANDIDATES = ("captions/text", "captions", "caption", "text")
LABEL_CANDIDATES = ("label",)
_OPEN_SOURCES: dict[tuple, object] = {}  # per worker process: (name, split, dir) -> source


def _tfds():
    import tensorflow_datasets as tfds  # slow import; only the TFDS source pays it

    return tfds


def load_builder(name: str, data_dir: str | None):
    """The builder of a prepared array_record dataset, or a ConversionError saying why not."""
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConversionError(
            f"TFDS dataset {name!r} is not prepared in --tfds_data_dir "
            f"{data_dir or '(TFDS default, ~/tensorflow_datasets)'}: {str(e).splitlines()[0]}"
        ) from e
    where = data_dir or "the TFDS default data_dir"
    if not builder.is_prepared():
        raise ConversionError(
            f"TFDS dataset {name!r} is not prepared in {where} (no {builder.data_dir}). This "
            f"converter does not download: prepare it first, in the array_record format, e.g.\n"
            f"    tfds build {name} --data_dir {data_dir or '~/tensorflow_datasets'} "
            f"--file_format=array_record\n(building needs TensorFlow; reading it here does not)."
        )
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(file_format) != "array_record":
        raise ConversionError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as {file_format}, which "
            f"cannot be read without TensorFlow. Rebuild it with --file_format=array_record:\n"
            f"    tfds build {name} --data_dir {data_dir or '~/tensorflow_datasets'} "
            f"--file_format=array_record"
        )
    return builder


def _feature_at(features, path: str):
    """The feature at 'a/b' (through Sequences), or None."""
    tfds = _tfds()
    feature = features
    for part in path.split("/"):
        while isinstance(feature, tfds.features.Sequence):
            feature = feature.feature
        if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature:
            return None
        feature = feature[part]
    return feature


def _is_text(feature) -> bool:
    tfds = _tfds()
    while isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return isinstance(feature, tfds.features.Text)


def value_at(item: dict, path: str):
    """A (possibly nested, 'captions/text') feature of a TFDS example."""
    value = item
    for part in path.split("/"):
        value = value[part]
    return value


def texts(value) -> list[str]:
    """A TFDS text feature (a string, bytes, or an array/list of them) as a list of str."""
    if isinstance(value, bytes | str | np.bytes_ | np.str_):
        value = [value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(value)]


class TfdsSource:
    """One split of a prepared TFDS dataset (array_record)."""

    kind = "tfds"

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        *,
        image_feature: str = "image",
        text_feature: str | None = None,
        label_feature: str | None = None,
    ):
        tfds = _tfds()
        self.name, self.split = name, split
        self.data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
        builder = load_builder(name, self.data_dir)
        features = builder.info.features
        available = ", ".join(sorted(features.keys()))
        self.version = str(builder.info.version)
        self.image_feature = image_feature
        if not isinstance(_feature_at(features, image_feature), tfds.features.Image):
            raise ConversionError(
                f"{name} has no image feature {image_feature!r} (features: {available}); "
                f"pass --image_feature"
            )
        self.text_feature = self._pick(features, text_feature, TEXT_CANDIDATES, "text")
        self.label_feature = self._pick(features, label_feature, LABEL_CANDIDATES, "label")
        if self.text_feature is None and self.label_feature is None:
            raise ConversionError(
                f"{name} has neither a caption nor a label feature under a common name "
                f"(features: {available}); pass --text_feature or --label_feature"
            )
        self.has_text = self.text_feature is not None
        self.label_names = (
            list(_feature_at(features, self.label_feature).names) if self.label_feature else None
        )
        try:  # also accepts TFDS slices such as "train[:10%]"
            self.num_examples = builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            raise ConversionError(
                f"{name} has no split {split!r} ({e}); splits: {', '.join(builder.info.splits)}"
            ) from e

    def _pick(self, features, chosen: str | None, candidates, what: str) -> str | None:
        """The configured feature (validated), or the first matching common name; 'none'
        disables it."""
        tfds = _tfds()

        def valid(path):
            feature = _feature_at(features, path)
            if what == "text":
                return feature is not None and _is_text(feature)
            return isinstance(feature, tfds.features.ClassLabel) and "/" not in path

        if chosen is not None:
            if chosen.lower() == "none":
                return None
            if not valid(chosen):
                kind = "Text (or a sequence of Text)" if what == "text" else "scalar ClassLabel"
                raise ConversionError(
                    f"--{what}_feature={chosen!r} is not a {kind} feature of {self.name} "
                    f"(features: {', '.join(sorted(features.keys()))})"
                )
            return chosen
        return next((c for c in candidates if valid(c)), None)

    def plan(self, num_shards: int, records_per_shard: int) -> list[range]:
        return split_evenly(range(self.num_examples), num_shards, records_per_shard)

    def _open(self):
        key = (self.name, self.split, self.data_dir, self.image_feature)
        if key not in _OPEN_SOURCES:
            tfds = _tfds()
            builder = load_builder(self.name, self.data_dir)
            decoders: dict = {}
            node = decoders
            *parents, leaf = self.image_feature.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tfds.decode.SkipDecoding()  # keep the stored PNG/JPEG bytes
            _OPEN_SOURCES[key] = builder.as_data_source(split=self.split, decoders=decoders)
        return _OPEN_SOURCES[key]

    def read(self, task: range) -> Iterator[Example | Skip]:
        source = self._open()
        for index in task:
            key = f"{self.split}/{index}"
            try:
                item = source[index]
            except Exception as e:  # a damaged record: skip it, keep converting
                yield Skip("undecodable_image", key, f"cannot read record: {e}")
                continue
            captions = texts(value_at(item, self.text_feature)) if self.text_feature else []
            label = int(value_at(item, self.label_feature)) if self.label_feature else None
            yield Example(
                key=key,
                image=bytes(value_at(item, self.image_feature)),
                captions=captions,
                label=label,
            )

    def describe(self) -> dict:
        return {
            "type": self.kind,
            "name": self.name,
            "version": self.version,
            "split": self.split,
            "data_dir": self.data_dir,
            "image_feature": self.image_feature,
            "text_feature": self.text_feature,
            "label_feature": self.label_feature,
        }


def split_names(name: str, data_dir: str | None) -> list[str]:
    """Every split of a prepared dataset, in the order TFDS lists them."""
    return list(load_builder(name, data_dir).info.splits.keys())
