"""Files of a hub-format SEDD model (`config.json` + `model.safetensors` or `pytorch_model.bin`).

A name is a local directory when one exists at that path; otherwise it is a HuggingFace Hub repo id.
A missing local path and an unreachable hub raise two different errors that say what to do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
WEIGHT_NAMES = (SAFETENSORS_NAME, PICKLE_NAME)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """A local model path does not exist, or holds no model."""


class HubUnreachableError(ConnectionError):
    """The HuggingFace Hub could not be reached and the files are not cached."""


@dataclass(frozen=True)
class PretrainedFiles:
    config: Path
    weights: Path


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, not a filesystem-looking path (`./x`, `/x`, `~/x`, `x/y/z`)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def is_hub_directory(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and any((path / name).is_file() for name in WEIGHT_NAMES)


def local_files(directory: Path) -> PretrainedFiles:
    """Files of a local hub-format directory, or a ModelNotFoundError listing what is there."""
    weights = next((directory / n for n in WEIGHT_NAMES if (directory / n).is_file()), None)
    if not (directory / CONFIG_NAME).is_file() or weights is None:
        present = sorted(p.name for p in directory.iterdir())[:20]
        raise ModelNotFoundError(
            f"{directory} is not a hub-format SEDD model: it needs {CONFIG_NAME} and one of {list(WEIGHT_NAMES)}, "
            f"found {present}. For a training run directory use `load_model(path)`."
        )
    return PretrainedFiles(directory / CONFIG_NAME, weights)


def resolve_pretrained_files(
    name_or_path: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> PretrainedFiles:
    """Local directory first; otherwise download (or take from the cache) `config.json` and the weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return local_files(path)
    if path.exists() or not looks_like_hub_id(name_or_path):
        raise ModelNotFoundError(
            f"Model path {name_or_path!r} does not exist (and is not a HuggingFace Hub id like 'louaaron/sedd-small'). "
            "Check the path, or pass a hub id."
        )
    kwargs = dict(
        repo_id=name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
    )
    try:
        config = hf_hub_download(filename=CONFIG_NAME, **kwargs)
        weights = _download_weights(kwargs)
    except LocalEntryNotFoundError as err:
        raise HubUnreachableError(
            f"Could not reach the HuggingFace Hub to fetch {name_or_path!r}, and it is not in the local cache "
            f"(no local directory of that name exists either). Check your network / HF_ENDPOINT, download it once "
            f"with `huggingface-cli download {name_or_path}`, or pass a local directory."
        ) from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither a local path nor a model on the HuggingFace Hub "
            "(private models need `huggingface-cli login`)."
        ) from err
    return PretrainedFiles(Path(config), Path(weights))


def _download_weights(kwargs: dict[str, Any]) -> str:
    try:
        return hf_hub_download(filename=SAFETENSORS_NAME, **kwargs)
    except LocalEntryNotFoundError:
        raise
    except EntryNotFoundError:
        return hf_hub_download(filename=PICKLE_NAME, **kwargs)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_state_dict_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read `model.safetensors` or `pytorch_model.bin` (tensors only, `weights_only=True`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)


def save_hub_directory(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write `model.safetensors` and `config.json` (the model's run config) into `directory`."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / SAFETENSORS_NAME))
    config = OmegaConf.to_container(model.config, resolve=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
