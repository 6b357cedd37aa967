"""Reading and writing state-dict files: safetensors without PyTorch; .pt/.bin/.pth with it.

PyTorch is an optional extra (``pip install -e .[weights-torch]``): only pickled and
TorchScript files (OpenAI's ``ViT-B-16.pt`` is TorchScript) need it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxclip.weights.architectures import WeightsError

TORCH_SUFFIXES = (".pt", ".bin", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
TORCH_MISSING = (
    "reading {path} needs PyTorch (pickled and TorchScript files): pip install -e "
    "'.[weights-torch]', or convert it to .safetensors where PyTorch is installed"
)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a weights file as a float32 numpy array, keys as stored."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        tensors = load_file(path)
    elif path.suffix in TORCH_SUFFIXES:
        tensors = _read_torch(path)
    else:
        raise WeightsError(f"{path}: unknown weights format; expected one of {WEIGHT_SUFFIXES}")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(TORCH_MISSING.format(path=path)) from None
    if _is_torchscript(path):
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # an open_clip training checkpoint: {epoch, state_dict, ...}
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # Distributed training wraps the model: "module.visual..." -> "visual...".
    return {
        k.removeprefix("module."): v.detach().float().numpy()
        for k, v in obj.items()
        if hasattr(v, "detach")
    }


def read_directory(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory (safetensors shards preferred, else one torch file)."""
    path = Path(path)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        shards = [p for suffix in TORCH_SUFFIXES for p in sorted(path.glob(f"*{suffix}"))][:1]
    if not shards:
        raise WeightsError(f"no weights in {path}: expected *.safetensors or *{TORCH_SUFFIXES}")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_state_dict(shard))
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    # np.array, not np.ascontiguousarray: the latter turns the 0-d logit_scale into shape (1,).
    save_file({k: np.array(v, np.float32, order="C") for k, v in tensors.items()}, str(path))


def write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
