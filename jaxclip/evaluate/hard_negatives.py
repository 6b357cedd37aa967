"""Hard-negative captions of a shapes-world scene (SugarCrepe's categories), and a checker
that decides whether a caption in the detailed-caption grammar is true of a scene.

The grammar is the one `shapes.detailed_caption` writes:

    caption  := phrase [relation phrase {"and" phrase}]
    phrase   := "a" size colour shape              e.g. "a large red circle"
    relation := "left of" | "right of" | "above" | "below"

A caption is true of a scene when its phrases can be given distinct objects of the scene,
each matching its phrase's size, colour and shape, such that the first phrase's object
stands in the relation to the second's (`shapes.spatial_relation`). The positive caption
(`detailed_caption`) is therefore always true.

Each negative changes the positive in one way that makes it false, and is built only when
the scene allows it (a single object has no relation to replace, no two objects to swap):

    replace_obj   one object's shape replaced, so the phrase names no object of the scene
    replace_att   one object's colour or size replaced, likewise
    swap_att      the colours (or sizes) of two objects exchanged, so a phrase names none
    replace_rel   the relation replaced by its opposite ("left of" -> "right of")
    swap_obj      the two related objects exchanged ("a X left of a Y" -> "a Y left of a X")
    add_obj       a phrase added for an object the scene does not have

The names are SugarCrepe's, so shapes-world and SugarCrepe metrics read the same way.
Negatives are built by reasoning about the scene, not by trying candidates against the
checker; tests check every one with `caption_is_true`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from jaxclip.data import shapes

CATEGORIES: tuple[str, ...] = (
    "replace_obj",
    "replace_att",
    "swap_att",
    "replace_rel",
    "swap_obj",
    "add_obj",
)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# (size, colour, shape) indices of one object phrase.
Phrase = tuple[int, int, int]


class CaptionGrammarError(ValueError):
    """A caption that is not in the detailed-caption grammar."""


# --- Writing and reading captions -----------------------------------------------------------


def phrases_of(scene: shapes.Scene) -> list[Phrase]:
    return [(o.size, o.colour, o.shape) for o in scene.objects]


def write_caption(phrases: Sequence[Phrase], relation: str | None) -> str:
    """The caption of `phrases` (the first two joined by `relation`, the rest by "and")."""
    words = [f"a {shapes.SIZES[s]} {shapes.COLOURS[c]} {shapes.SHAPES[k]}" for s, c, k in phrases]
    if len(words) == 1:
        return words[0]
    return f"{words[0]} {relation} " + " and ".join(words[1:])


def _grammar_error(caption: str, position: int, expected: str) -> CaptionGrammarError:
    return CaptionGrammarError(
        f"caption {caption!r}: expected {expected} at word {position + 1}; captions are "
        f"'a SIZE COLOUR SHAPE [RELATION a SIZE COLOUR SHAPE [and a SIZE COLOUR SHAPE ...]]'."
    )


def parse_caption(caption: str) -> tuple[list[Phrase], str | None]:
    """(phrases, relation) of a caption in the grammar; CaptionGrammarError otherwise."""
    words = caption.split()
    pos = 0

    def take(vocabulary: Sequence[str], what: str) -> int:
        nonlocal pos
        if pos >= len(words) or words[pos] not in vocabulary:
            raise _grammar_error(caption, pos, what)
        pos += 1
        return list(vocabulary).index(words[pos - 1])

    def phrase() -> Phrase:
        take(("a",), "'a'")
        return (
            take(shapes.SIZES, "a size"),
            take(shapes.COLOURS, "a colour"),
            take(shapes.SHAPES, "a shape"),
        )

    found = [phrase()]
    relation = None
    if pos < len(words):
        for candidate in shapes.RELATIONS:
            if words[pos : pos + len(candidate.split())] == candidate.split():
                relation, pos = candidate, pos + len(candidate.split())
                break
        else:
            raise _grammar_error(caption, pos, "a relation")
        found.append(phrase())
    while pos < len(words):
        take(("and",), "'and'")
        found.append(phrase())
    return found, relation


def caption_is_true(scene: shapes.Scene, caption: str) -> bool:
    """Whether distinct objects of the scene match the caption's phrases and relation."""
    wanted, relation = parse_caption(caption)
    objects = scene.objects
    have = phrases_of(scene)
    for chosen in itertools.permutations(range(len(objects)), len(wanted)):
        if any(have[i] != p for i, p in zip(chosen, wanted, strict=True)):
            continue
        if relation is None or shapes.spatial_relation(objects[chosen[0]], objects[chosen[1]]) == (
            relation
        ):
            return True
    return False


# --- Negatives --------------------------------------------------------------------------------


def _replace_obj(phrases, relation, rng):
    present = set(phrases)
    for k in rng.permutation(len(phrases)):
        size, colour, shape = phrases[k]
        for other in rng.permutation(len(shapes.SHAPES)):
            new = (size, colour, int(other))
            if new not in present:  # the phrase names no object: nothing can match it
                return _with(phrases, {k: new}), relation
    return None


def _replace_att(phrases, relation, rng):
    present = set(phrases)
    for k, field in itertools.product(rng.permutation(len(phrases)), rng.permutation(2)):
        size, colour, shape = phrases[k]
        if field == 0:
            options = [(1 - size, colour, shape)]
        else:
            options = [(size, int(c), shape) for c in rng.permutation(len(shapes.COLOURS))]
        for new in options:
            if new not in present:
                return _with(phrases, {k: new}), relation
    return None


def _swap_att(phrases, relation, rng):
    present = set(phrases)
    pairs = list(itertools.combinations(range(len(phrases)), 2))
    for p, field in itertools.product(rng.permutation(len(pairs)), rng.permutation(2)):
        i, j = pairs[p]
        a, b = list(phrases[i]), list(phrases[j])
        if a[field] == b[field]:
            continue
        a[field], b[field] = b[field], a[field]
        if tuple(a) not in present or tuple(b) not in present:
            return _with(phrases, {i: tuple(a), j: tuple(b)}), relation
    return None


def _distinct(phrases) -> bool:
    # With every phrase naming a different object, only one assignment of objects exists,
    # so changing the relation of the first two makes the caption false.
    return len(phrases) >= 2 and len(set(phrases)) == len(phrases)


def _replace_rel(phrases, relation, rng):
    return (phrases, OPPOSITE[relation]) if _distinct(phrases) else None


def _swap_obj(phrases, relation, rng):
    if not _distinct(phrases):
        return None
    return _with(phrases, {0: phrases[1], 1: phrases[0]}), relation


def _add_obj(phrases, relation, rng):
    present = set(phrases)
    for c in rng.permutation(len(shapes.ALLOWED_COMBOS)):
        shape, colour = shapes.ALLOWED_COMBOS[c]
        new = (int(rng.integers(len(shapes.SIZES))), colour, shape)
        if new not in present:
            if relation is None:
                relation = shapes.RELATIONS[int(rng.integers(len(shapes.RELATIONS)))]
            return [*phrases, new], relation
    return None


def _with(phrases, changes: dict) -> list[Phrase]:
    return [changes.get(k, p) for k, p in enumerate(phrases)]


_BUILDERS = {
    "replace_obj": _replace_obj,
    "replace_att": _replace_att,
    "swap_att": _swap_att,
    "replace_rel": _replace_rel,
    "swap_obj": _swap_obj,
    "add_obj": _add_obj,
}
assert tuple(_BUILDERS) == CATEGORIES


def hard_negatives(scene: shapes.Scene, key: Sequence[int]) -> dict[str, str]:
    """Category -> negative caption, for each category the scene allows.

    `key` seeds the choices (which object, which replacement): the same scene and key give
    the same negatives; each category draws from its own stream.
    """
    phrases, relation = phrases_of(scene), scene.relation
    negatives = {}
    for code, (category, build) in enumerate(_BUILDERS.items()):
        built = build(phrases, relation, np.random.default_rng([*key, code]))
        if built is not None:
            negatives[category] = write_caption(*built)
    return negatives
