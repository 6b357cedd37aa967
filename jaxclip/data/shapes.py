"""The "shapes world": a procedural, deterministic, random-access image-caption source.

Every example is a small synthetic scene: a dark, softly textured background (a vertical
gradient plus low noise) with 1..``max_objects`` coloured shapes on it. Each object has a
shape (8 kinds), a colour (8 kinds), a size ("small" or "large"), a position and a depth.
Object 0 is the MAIN object: it is the nearest, is drawn last (so it is never occluded),
and it is the one short captions describe and the labels refer to.

Everything about example ``i`` is a pure function of ``(seed, split, i)``: the scene is
sampled from ``np.random.default_rng([seed, split_code, i, 0])`` and rendered with numpy
only, so any index can be produced on demand in any process, in any order (grain's
random-access contract), without files or downloads.

Splits and the held-out design (compositional generalisation):

- ``HELD_OUT_COMBOS`` holds one (shape, colour) pair per shape, arranged as a Latin-square
  diagonal so that every colour is held out for exactly one shape. Each shape and each
  colour is therefore still seen in training, only these particular pairings are not.
- ``"train"``: no object anywhere in the image is a held-out combination.
- ``"val"``: the same distribution as train but an independent random stream. With
  ``single_object=True`` the main combination cycles through ``ALLOWED_COMBOS`` so that
  zero-shot classification is class-balanced.
- ``"heldout"``: the main object is a held-out combination, cycling through
  ``HELD_OUT_COMBOS`` (class-balanced); other objects come from the allowed combinations.

Fields of an example (fixed shapes and dtypes so grain can batch them):

- ``image`` uint8 (S, S, 3); ``caption`` str; ``key`` str such as ``"train/000123"``.
- ``shape``, ``colour``, ``size``, ``combo``: int32 labels of the main object, for
  zero-shot and linear-probe classification; ``num_objects`` int32.
- ``mask`` uint8 (S, S): ``shape_idx + 1`` of the visible object per pixel, 0 for
  background; ``depth`` float32 (S, S): background is a floor-like gradient, objects sit
  at their own (smaller = nearer) depth. These two exist for dense (per-patch) probes.

Captions are computed from the sampled scene alone (no rendering), so the caption of any
other index is cheap; this is what the caption-noise option uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxclip.data.shapes_render import render as render  # re-exported
from jaxclip.tokenizer import Tokenizer, word_level_tokenizer

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "hexagon",
    "heart",
)
COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "white",
)
# RGB of each colour; chosen far apart from each other and from the dark background.
COLOUR_RGB: tuple[tuple[int, int, int], ...] = (
    (225, 40, 40),
    (245, 140, 20),
    (240, 230, 40),
    (40, 190, 60),
    (40, 220, 230),
    (40, 70, 235),
    (150, 50, 210),
    (245, 245, 245),
)
SIZES: tuple[str, ...] = ("small", "large")
# Object extent (diameter) as a fraction of the image side, per size.
SIZE_RANGES: tuple[tuple[float, float], ...] = ((0.22, 0.30), (0.40, 0.55))
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Templates of short captions; exported so zero-shot evaluators can ensemble exactly the
# phrasings seen in training. Articles are not adapted ("a orange circle") so that a
# prompt is always a plain ``template.format(phrase)``.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a photo of a {}",
    "an image of a {}",
    "a picture with a {}",
)
GENERIC_NOUN = "shape"
# Probabilities that a short caption drops the colour / replaces the noun by "shape", so
# colour-only and shape-only prompts are in-distribution.
P_DROP_COLOUR = 0.1
P_GENERIC_NOUN = 0.1

SPLITS: tuple[str, ...] = ("train", "val", "heldout")
CAPTION_STYLES: tuple[str, ...] = ("short", "detailed", "mixed")


def combo_id(shape: int, colour: int) -> int:
    """Index of a (shape, colour) pair in ``0 .. len(SHAPES) * len(COLOURS) - 1``."""
    return shape * len(COLOURS) + colour


# colour = (3 * shape + 1) % 8 is a permutation of the colours, so each colour is held
# out for exactly one shape.
HELD_OUT_COMBOS: tuple[tuple[int, int], ...] = tuple(
    (s, (3 * s + 1) % len(COLOURS)) for s in range(len(SHAPES))
)
ALLOWED_COMBOS: tuple[tuple[int, int], ...] = tuple(
    (s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (s, c) not in HELD_OUT_COMBOS
)


# ---------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object; geometry is in image-side units (0..1) so a scene is size-independent."""

    shape: int
    colour: int
    size: int  # index into SIZES
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height (0 = top)
    extent: float  # diameter, fraction of the image side
    depth: float  # smaller = nearer to the camera
    rgb: tuple[float, float, float]  # COLOUR_RGB with a small per-object jitter


@dataclasses.dataclass(frozen=True)
class Scene:
    """A sampled scene; ``objects[0]`` is the main (nearest) object."""

    objects: tuple[SceneObject, ...]
    bg_top: tuple[float, float, float]
    bg_bottom: tuple[float, float, float]
    texture_seed: int

    @property
    def main(self) -> SceneObject:
        return self.objects[0]

    @property
    def relation(self) -> str | None:
        """Spatial relation of the main object to object 1 (None for a single object)."""
        if len(self.objects) < 2:
            return None
        return spatial_relation(self.objects[0], self.objects[1])


def spatial_relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` along the axis on which they are further apart."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _sample_positions(rng: np.random.Generator, extents: list[float]) -> list[tuple[float, float]]:
    """Centres that keep every object inside the image and try to limit overlap."""
    centres: list[tuple[float, float]] = []
    for ext in extents:
        r = ext / 2
        best, best_score = (0.5, 0.5), -np.inf
        # A few tries, keeping the least overlapping; perfect packing is not required.
        for _ in range(8):
            cx, cy = rng.uniform(r, 1 - r, size=2)
            score = min(
                (
                    np.hypot(cx - px, cy - py) / (r + pe / 2)
                    for (px, py), pe in zip(centres, extents[: len(centres)], strict=True)
                ),
                default=np.inf,
            )
            if score > best_score:
                best, best_score = (float(cx), float(cy)), score
            if score >= 0.9:
                break
        centres.append(best)
    return centres


def sample_scene(
    split: str,
    index: int,
    seed: int = 0,
    max_objects: int = 3,
    single_object: bool = False,
) -> Scene:
    """Sample the scene of example ``index`` (pure function of its arguments)."""
    code = _split_code(split)
    rng = np.random.default_rng([seed, code, index, 0])
    n = 1 if single_object else int(rng.integers(1, max_objects + 1))

    combos: list[tuple[int, int]] = []
    if split == "heldout":
        combos.append(HELD_OUT_COMBOS[index % len(HELD_OUT_COMBOS)])
    elif split == "val" and single_object:
        combos.append(ALLOWED_COMBOS[index % len(ALLOWED_COMBOS)])
    while len(combos) < n:
        combos.append(ALLOWED_COMBOS[int(rng.integers(len(ALLOWED_COMBOS)))])

    sizes = [int(rng.integers(len(SIZES))) for _ in range(n)]
    extents = [float(rng.uniform(*SIZE_RANGES[s])) for s in sizes]
    centres = _sample_positions(rng, extents)
    # The main object is strictly nearest; the others lie behind it.
    depths = [float(rng.uniform(0.6, 0.9))] + [float(d) for d in rng.uniform(1.0, 1.9, n - 1)]
    jitter = rng.uniform(-10, 10, size=(n, 3))

    objects = tuple(
        SceneObject(
            shape=s,
            colour=c,
            size=sizes[i],
            x=centres[i][0],
            y=centres[i][1],
            extent=extents[i],
            depth=depths[i],
            rgb=tuple(float(v) for v in np.clip(np.add(COLOUR_RGB[c], jitter[i]), 0, 255)),
        )
        for i, (s, c) in enumerate(combos)
    )
    top = rng.uniform(8, 30, size=3)
    bottom = rng.uniform(25, 55, size=3)
    return Scene(
        objects=objects,
        bg_top=tuple(float(v) for v in top),
        bg_bottom=tuple(float(v) for v in bottom),
        texture_seed=int(rng.integers(2**31)),
    )


# ---------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------


def object_phrase(obj: SceneObject, with_size: bool = False) -> str:
    """ "red circle" (or "large red circle" with ``with_size``)."""
    words = [SIZES[obj.size]] if with_size else []
    return " ".join([*words, COLOURS[obj.colour], SHAPES[obj.shape]])


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Main object only, in one of ``PROMPT_TEMPLATES``; may drop the colour or the noun."""
    obj = scene.main
    u = rng.random()
    if u < P_DROP_COLOUR:
        phrase = SHAPES[obj.shape]
    elif u < P_DROP_COLOUR + P_GENERIC_NOUN:
        phrase = f"{COLOURS[obj.colour]} {GENERIC_NOUN}"
    else:
        phrase = object_phrase(obj)
    return PROMPT_TEMPLATES[int(rng.integers(len(PROMPT_TEMPLATES)))].format(phrase)


def detailed_caption(scene: Scene) -> str:
    """Every object with size and colour, plus the main object's relation to object 1."""
    phrases = [f"a {object_phrase(o, with_size=True)}" for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    rest = " and ".join(phrases[1:])
    return f"{phrases[0]} {scene.relation} {rest}"


def vocabulary() -> list[str]:
    """Every word any caption or prompt can contain (sorted)."""
    texts = [t.format("") for t in PROMPT_TEMPLATES]
    texts += [*SHAPES, *COLOURS, *SIZES, *RELATIONS, GENERIC_NOUN, "a", "and"]
    return sorted({w for text in texts for w in text.split()})


def shapes_tokenizer(context_length: int = 32) -> Tokenizer:
    """The word-level tokenizer of every word a caption or prompt can contain."""
    return word_level_tokenizer(vocabulary(), context_length)


def class_names(task: str) -> list[str]:
    """Phrases to put into ``PROMPT_TEMPLATES`` for zero-shot classification of ``task``.

    "shape" -> "circle", "colour" -> "red shape", "combo" -> "red circle" (index = combo_id).
    """
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return [f"{c} {GENERIC_NOUN}" for c in COLOURS]
    if task == "combo":
        return [f"{c} {s}" for s in SHAPES for c in COLOURS]
    raise ValueError(f"task must be 'shape', 'colour' or 'combo', got {task!r}")


# ---------------------------------------------------------------------------------------
# Data source
# ---------------------------------------------------------------------------------------


class ShapesWorld:
    """Grain-compatible random-access source of shapes-world examples.

    Holds only immutable configuration, so it is thread-safe and cheap to pickle into
    grain worker processes.
    """

    def __init__(
        self,
        split: str = "train",
        num_examples: int = 100_000,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 3,
        caption_style: str = "mixed",
        noise_prob: float = 0.0,
        single_object: bool = False,
    ) -> None:
        self._code = _split_code(split)
        if caption_style not in CAPTION_STYLES:
            raise ValueError(f"caption_style must be one of {CAPTION_STYLES}")
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError("noise_prob must be in [0, 1]")
        if max_objects < 1 or num_examples < 1 or image_size < 8:
            raise ValueError("need max_objects >= 1, num_examples >= 1, image_size >= 8")
        self.split = split
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.max_objects = max_objects
        self.caption_style = caption_style
        self.noise_prob = noise_prob
        self.single_object = single_object

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}, max_objects={self.max_objects}, "
            f"caption_style={self.caption_style!r}, noise_prob={self.noise_prob}, "
            f"single_object={self.single_object})"
        )

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return index

    def scene(self, index: int) -> Scene:
        """The sampled scene (all objects and their metadata) of ``index``."""
        index = self._check(index)
        return sample_scene(self.split, index, self.seed, self.max_objects, self.single_object)

    def clean_caption(self, index: int, scene: Scene | None = None) -> str:
        """Caption of ``index`` in the configured style, before any noise (``scene``: the
        index's scene when the caller has sampled it already)."""
        scene = self.scene(index) if scene is None else scene
        rng = np.random.default_rng([self.seed, self._code, int(index), 1])
        style = self.caption_style
        if style == "mixed":
            style = "short" if rng.random() < 0.5 else "detailed"
        return short_caption(scene, rng) if style == "short" else detailed_caption(scene)

    def caption(self, index: int, scene: Scene | None = None) -> str:
        """Caption of ``index`` with the configured noise applied."""
        clean = self.clean_caption(index, scene)
        if self.noise_prob == 0.0:
            return clean
        rng = np.random.default_rng([self.seed, self._code, int(index), 2])
        if rng.random() >= self.noise_prob:
            return clean
        words = clean.split()
        # Half of the corrupted captions are swapped for another example's caption, half
        # truncated; captions too short to truncate are swapped instead.
        if (rng.random() < 0.5 or len(words) <= 2) and self.num_examples > 1:
            other = (int(index) + 1 + int(rng.integers(self.num_examples - 1))) % self.num_examples
            return self.clean_caption(other)
        drop = min(int(rng.integers(1, 4)), len(words) - 2)
        return " ".join(words[: len(words) - drop]) if drop > 0 else clean

    def describe(self, index: int) -> str:
        """Human-readable one-liner: key, detailed description and caption."""
        return f"{self.key(index)}: {detailed_caption(self.scene(index))} | {self.caption(index)!r}"

    def key(self, index: int) -> str:
        return f"{self.split}/{self._check(index):06d}"

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = self._check(index)
        scene = self.scene(index)
        image, mask, depth = render(scene, self.image_size)
        main = scene.main
        return {
            "image": image,
            "caption": self.caption(index, scene),  # the scene is sampled once
            "key": self.key(index),
            "shape": np.int32(main.shape),
            "colour": np.int32(main.colour),
            "size": np.int32(main.size),
            "combo": np.int32(combo_id(main.shape, main.colour)),
            "num_objects": np.int32(len(scene.objects)),
            "mask": mask,
            "depth": depth,
        }
