"""`rqpipe convert-lpips`: the perceptual loss's weights file, built from files a user can get.

LPIPS-VGG (Zhang et al. 2018) is two things: torchvision's ImageNet VGG16 (`vgg16-397923af.pth`,
the `features.*` convolutions) and five linear heads that the `lpips` package ships as
`lpips/weights/v0.1/vgg.pth` (`lin{j}.model.1.weight`). Neither is downloaded here. This module
reads both with `torch.load(weights_only=True)` (never a full unpickle), checks every tensor's
name and shape, and writes the one safetensors file `model.losses.PerceptualLoss` loads:
`features.{i}.weight|bias` for the 13 convolutions and `lin{j}.weight` for the heads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.losses import _VGG16_CONVS, LPIPS_CHANNELS, PerceptualLoss


def installed_lpips_heads() -> str | None:
    """The `lpips` package's VGG heads file, when that package is installed (found without
    importing it: `import lpips` pulls in torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return str(path) if path.is_file() else None


def _load(path: str, what: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs more than tensors is refused here
        raise ValueError(f"{path!r} is not a plain tensor state dict ({what}): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict ({what})")
    return state


def _expect(
    state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: str
) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path!r} has no tensor {key!r}: is it the right file?")
    if tuple(state[key].shape) != shape:
        raise ValueError(f"{path!r}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    return state[key].float().contiguous()


def convert_lpips(vgg16_path: str, out_path: str, heads_path: str | None = None) -> dict[str, int]:
    """Write the PerceptualLoss weights file; returns {"tensors", "dropped"} counts."""
    heads_path = heads_path or installed_lpips_heads()
    if heads_path is None:
        raise FileNotFoundError(
            "no LPIPS heads file given and the lpips package is not installed: pass --heads "
            "PATH/lpips/weights/v0.1/vgg.pth (`pip download lpips==0.1.4 --no-deps` and unzip "
            "the wheel to get it)"
        )
    vgg, heads = _load(vgg16_path, "torchvision VGG16 weights"), _load(heads_path, "LPIPS heads")
    out: dict[str, torch.Tensor] = {}
    for i, (cin, cout) in _VGG16_CONVS.items():
        out[f"features.{i}.weight"] = _expect(vgg, f"features.{i}.weight", (cout, cin, 3, 3),
                                              vgg16_path)  # fmt: skip
        out[f"features.{i}.bias"] = _expect(vgg, f"features.{i}.bias", (cout,), vgg16_path)
    for j, channels in enumerate(LPIPS_CHANNELS):
        out[f"lin{j}.weight"] = _expect(heads, f"lin{j}.model.1.weight", (1, channels, 1, 1),
                                        heads_path)  # fmt: skip
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_path}.tmp"
    save_file(out, tmp)
    os.replace(tmp, out_path)
    PerceptualLoss(out_path)  # the file loads as the loss loads it, or this raises
    dropped = len(vgg) + len(heads) - len(out)  # the VGG classifier: not part of LPIPS
    return {"tensors": len(out), "dropped": dropped}
