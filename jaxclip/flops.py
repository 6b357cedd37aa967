"""Model FLOPs per example from a config, per-device bf16 peaks, and MFU.

Convention (the one MFU figures in papers use): only matrix multiplications count, 2 FLOPs
per multiply-add; a training example costs 3x its forward pass (the backward pass computes
two products per forward one); recomputation under remat is not counted (it is hardware
work, not model work), and neither are norms, softmax, activations or the optimizer.
Attention counts its full L x L scores also where the text tower's causal mask makes half of
them unused. With patch dropout, the image tower sees only the kept patches (+ class token).

Per transformer layer of width D, MLP width M over T tokens, the forward pass is
  q, k, v, out projections 4 * 2TD^2  +  MLP 2 * 2TDM  +  scores QK^T and PV 2 * 2T^2 D.
The loss multiplies the (B, E) image and text embeddings once: 2BE per example (it grows
with the global batch B).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxclip import model_kinds
from jaxclip.models.vit import decode_variant


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of one example, by part."""

    image: float
    text: float  # 0 for LIFT (the text side is stored embeddings)
    head: float  # projections into the shared space (CLIP) or LIFT's two-layer head
    loss: float

    @property
    def forward(self) -> float:
        return self.image + self.text + self.head + self.loss

    @property
    def train(self) -> float:
        """Forward + backward: the 3x convention."""
        return 3 * self.forward


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward FLOPs of `depth` pre-norm blocks over `tokens` tokens."""
    t, d, m = tokens, width, mlp_dim
    per_layer = 8 * t * d * d + 4 * t * d * m + 4 * t * t * d
    return float(depth * per_layer)


def image_tokens(cfg: ml_collections.ConfigDict, training: bool = True) -> int:
    """Tokens through the image tower: kept patches (training) plus the class token."""
    vit = decode_variant(cfg.model.image.variant)
    patches = (cfg.data.image_size // vit["patch"]) ** 2
    if training and cfg.model.image.patch_dropout > 0:
        patches = max(1, int(patches * (1.0 - cfg.model.image.patch_dropout)))
    return patches + (1 if cfg.model.image.pool == "cls" else 0)


def model_flops(cfg: ml_collections.ConfigDict, *, training: bool = True) -> ModelFlops:
    """Analytic forward FLOPs per example of the configured model at its global batch."""
    vit = decode_variant(cfg.model.image.variant)
    width, embed = vit["width"], cfg.model.embed_dim
    patches = image_tokens(cfg, training) - (1 if cfg.model.image.pool == "cls" else 0)
    patch_embed = 2.0 * patches * (vit["patch"] ** 2 * 3) * width
    image = patch_embed + transformer_flops(
        image_tokens(cfg, training), width, vit["depth"], vit["mlp_dim"]
    )
    text, head = model_kinds.get(cfg).text_and_head_flops(cfg, width)
    loss = 2.0 * cfg.data.batch_size * embed
    return ModelFlops(image=image, text=text, head=head, loss=loss)


# Dense (no sparsity) bfloat16 matrix peaks per device, TFLOP/s, from the vendors' pages.
# NVIDIA's datasheets quote "with sparsity" figures; dense is half of those.
PEAK_BF16_TFLOPS: dict[str, tuple[float, str]] = {
    "h100 sxm": (989.0, "NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    "h100 pcie": (756.0, "NVIDIA H100 datasheet: PCIe BF16 1,513 TFLOPS with sparsity"),
    "h200": (989.0, "NVIDIA H200 datasheet: SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    "a100": (312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    "b200": (2250.0, "NVIDIA HGX B200: FP16/BF16 Tensor Core 4.5 PFLOPS with sparsity per GPU"),
    "tpu v4": (275.0, "Cloud TPU v4 docs: peak compute per chip (bf16) 275 TFLOPs"),
    "tpu v5e": (197.0, "Cloud TPU v5e docs: peak compute per chip (bf16) 197 TFLOPs"),
    "tpu v5p": (459.0, "Cloud TPU v5p docs: peak compute per chip (bf16) 459 TFLOPs"),
    "tpu v6e": (918.0, "Cloud TPU v6e docs: peak compute per chip (bf16) 918 TFLOPs"),
}

# JAX's device_kind strings -> table keys (checked in order: "TPU v5 lite" before "TPU v5").
_DEVICE_KINDS = (
    ("h100 pcie", "h100 pcie"),
    ("h100", "h100 sxm"),
    ("h200", "h200"),
    ("a100", "a100"),
    ("b200", "b200"),
    ("v6 lite", "tpu v6e"),
    ("v6e", "tpu v6e"),
    ("v5 lite", "tpu v5e"),
    ("v5e", "tpu v5e"),
    ("v5", "tpu v5p"),
    ("v4", "tpu v4"),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device (`jax.Device.device_kind`), None if unknown."""
    kind = device_kind.lower()
    for needle, key in _DEVICE_KINDS:
        if needle in kind:
            return PEAK_BF16_TFLOPS[key][0] * 1e12
    return None


def mfu(examples_per_s: float, flops_per_example: float, devices: int, peak: float) -> float:
    """Model FLOPs utilization: model FLOP/s achieved over the devices' peak FLOP/s."""
    return examples_per_s * flops_per_example / (devices * peak)
