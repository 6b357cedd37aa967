"""Prompt templates for zero-shot classification on real datasets (from the CLIP paper).

A class's weight vector is the re-normalized mean of its prompts' embeddings over a template
ensemble. CLIP published an 80-prompt ensemble for ImageNet and an 18-prompt one for CIFAR;
using the same ones keeps jaxclip's numbers comparable with published zero-shot results.
The ImageNet ensemble describes renditions of an object (photos, drawings, toys, ...), so it
is also the default for image folders and converted datasets, where nothing better is known.
"""

from __future__ import annotations

from jaxclip.config import ConfigError
from jaxclip.data.shapes import PROMPT_TEMPLATES

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

# Prompts the shapes world's captions never use, for zero-shot transfer to unseen phrasings.
# Built from words of its vocabulary only (shapes.vocabulary()): its word-level tokenizer
# maps any other word to <unk>, whose embedding the text tower never learns, so a new word
# would test nothing but noise. These recombine template words ("picture of", "photo with",
# the bare phrase, "an" before a colour) in orders no caption has; no size word appears, so
# none can equal a detailed caption either (tests/test_grounding.py checks both).
SHAPES_UNSEEN_TEMPLATES = (
    "{}",
    "an {}",
    "a picture of a {}",
    "a photo with a {}",
    "an image with a {}",
)

# One prompt: cheap, and the right choice for a model trained on very short captions.
SIMPLE_TEMPLATES = ("a photo of a {}.",)

ENSEMBLES = {
    "imagenet": IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "shapes": PROMPT_TEMPLATES,  # the shapes world's own caption phrasings
    "shapes_unseen": SHAPES_UNSEEN_TEMPLATES,  # phrasings its captions never use
}

# The ensemble CLIP used for each TFDS dataset; anything else gets the ImageNet one.
_DATASET_ENSEMBLE = {"cifar10": "cifar", "cifar100": "cifar"}


def default_ensemble(dataset: str) -> str:
    """The ensemble name for a TFDS dataset name (e.g. 'cifar10' -> 'cifar')."""
    return _DATASET_ENSEMBLE.get(dataset.split("/")[0].split(":")[0], "imagenet")


def ensemble(name: str) -> tuple[str, ...]:
    if name not in ENSEMBLES:
        raise ConfigError(
            f"Unknown prompt template ensemble {name!r}; choose one of {', '.join(ENSEMBLES)}."
        )
    return ENSEMBLES[name]
