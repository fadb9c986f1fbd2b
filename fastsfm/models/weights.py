"""Backbone weights in their published formats, from local files and caches only (never downloaded).

* :func:`read_state_dict` reads a file as its publisher wrote it: safetensors, a PyTorch state
  dict (``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers),
  or a TorchScript archive (OpenAI CLIP's ``ViT-B-16.pt``, whose state dict ``torch.jit.load``
  reads as ``clip.load`` does).
* :func:`load_into` puts such a state dict into a timm model through the model family's own
  ``checkpoint_filter_fn`` (timm's converters of OpenAI CLIP, torch.hub DINOv2, ... key names),
  dropping the classifier of a headless model, then loads it strictly: a missing or
  unexpected key is an error that names it.
* :func:`mixin_checkpoint` finds a ``PyTorchModelHubMixin`` checkpoint (MoCo-v3's
  ``nyu-visionx/moco-v3-vit-b``: a ``config.json`` of the model's init arguments beside
  ``model.safetensors`` or ``pytorch_model.bin``) in a folder, a lone weights file, or the
  Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["read_state_dict", "load_into", "mixin_checkpoint", "file_digest", "hub_offline", "MIXIN_WEIGHTS"]

MIXIN_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""Weight files of a PyTorchModelHubMixin checkpoint (huggingface_hub writes the first, older versions the second)."""


def file_digest(path: Path) -> str:
    """A short content hash of a file (identifies weights in statistics and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (safetensors, PyTorch state dict, or TorchScript archive) on CPU."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if _is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader's failure means the same to the user
        raise ValueError(f"{path} is not a readable weights file ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(state).__name__})")
    return state


def load_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a published state dict into a timm model via its family's ``checkpoint_filter_fn``."""
    family = sys.modules[type(model).__module__]
    convert = getattr(family, "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    own = model.state_dict()
    head = getattr(model, "default_cfg", {}).get("classifier", "head")
    state = {k: v for k, v in state.items() if k in own or not k.startswith(f"{head}.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: missing keys {missing[:6]}, unexpected keys "
            f"{unexpected[:6]} (is it the checkpoint of this backbone?)"
        )
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"{source}: tensors of other shapes than the model's (key, file, model): {shapes[:4]}")
    model.load_state_dict(state)


@contextlib.contextmanager
def hub_offline():
    """Make huggingface_hub (which timm downloads through) use its local cache only."""
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _missing_mixin(repo: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no checkpoint of {repo} {where}. fastsfm never downloads: where there is internet, run "
        f"`huggingface-cli download {repo}` (it fills the Hugging Face cache, which fastsfm reads), or copy "
        f"config.json and model.safetensors from https://huggingface.co/{repo} into one folder and pass it "
        "with --weights FOLDER (Python: pretrained='FOLDER')"
    )


def mixin_checkpoint(repo: str, location: str | Path | None = None) -> tuple[Path, dict]:
    """``(weights file, config)`` of a PyTorchModelHubMixin checkpoint of ``repo``: in the folder
    ``location`` (``config.json`` + :data:`MIXIN_WEIGHTS`), the weights file ``location`` (then the
    config is empty: the architecture's defaults), or (``location=None``) the Hugging Face cache."""
    if location is None:
        from huggingface_hub import snapshot_download

        try:
            with hub_offline():
                folder = Path(snapshot_download(repo, local_files_only=True))
        except Exception as err:  # noqa: BLE001 - any cache miss gets the same instructions
            raise _missing_mixin(repo, "in the Hugging Face cache") from err
    else:
        folder = Path(location)
        if folder.is_file():
            return folder, {}
        if not folder.is_dir():
            raise _missing_mixin(repo, f"at {folder} (neither a folder nor a file)")
    weights = next((folder / name for name in MIXIN_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise _missing_mixin(repo, f"in {folder} (no {' or '.join(MIXIN_WEIGHTS)})")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not a readable JSON model config: {err}") from err
    return weights, config
