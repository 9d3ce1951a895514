"""Locate an adapter (local directory or Hub repo id) and read its config and tensors safely.

Weights are read from ``adapter_model.safetensors`` first, then ``adapter_model.bin`` / ``.pt`` through
``torch.load(weights_only=True)``: a pickled checkpoint never runs code here.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.errors import CorruptCheckpointError, InvalidConfigError, SourceNotFoundError, first_line

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.pt", "*.md"]


def resolve_source(
    src: str | Path, *, what: str = "an adapter directory", fetch: Callable[[str], Path] | None = None
) -> Path:
    """A local directory for ``src``: the path itself, or the Hub snapshot of a repo id.

    Hub ids go through ``huggingface_hub.snapshot_download``, so ``HF_HUB_OFFLINE=1`` is served from the local
    cache and a cached snapshot costs no network.

    Args:
        what: what ``src`` should be, for the message when it is a file.
        fetch: ``repo_id -> local snapshot``; default: the adapter files (json, safetensors, bin, pt, md).

    Raises:
        SourceNotFoundError: neither a directory nor a repo id the Hub (or its cache) can provide.
    """
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise SourceNotFoundError(f"is a file; expected {what}", path=path)
    text = str(src)
    if not _REPO_ID_RE.match(text) or text.startswith((".", "~")):
        raise SourceNotFoundError("no such directory", path=path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return fetch(text) if fetch else Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise SourceNotFoundError(
            f"no such local directory, and the Hub could not provide it ({first_line(exc)})", path=text
        ) from exc


def read_json(path: Path) -> dict:
    """Parse a JSON object file.

    Raises:
        SourceNotFoundError: the file does not exist.
        InvalidConfigError: it is not valid JSON or not an object.
    """
    if not path.is_file():
        raise SourceNotFoundError("missing file", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"not valid JSON ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise InvalidConfigError("expected a JSON object", path=path)
    return data


@dataclass(frozen=True)
class AdapterFiles:
    """The two files of an adapter directory that matter, and its parsed config."""

    root: Path
    config: dict
    config_path: Path
    weights_path: Path


def open_adapter_dir(src: str | Path) -> AdapterFiles:
    """Resolve ``src`` and find its config and weights file.

    Raises:
        SourceNotFoundError: no directory, no adapter_config.json or no weights file.
        InvalidConfigError: adapter_config.json cannot be parsed.
    """
    root = resolve_source(src)
    config_path = root / CONFIG_NAME
    config = read_json(config_path)
    return AdapterFiles(root, config, config_path, weights_file(root))


def weights_file(root: Path) -> Path:
    """The adapter weights file in ``root``, in the order PEFT and vLLM look: safetensors first, then .bin / .pt.

    Raises:
        SourceNotFoundError: there is none.
    """
    path = next((root / name for name in WEIGHTS_NAMES if (root / name).is_file()), None)
    if path is None:
        raise SourceNotFoundError(f"no adapter weights (looked for {', '.join(WEIGHTS_NAMES)})", path=root)
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors or weights-only torch file, on CPU.

    Raises:
        CorruptCheckpointError: the file is truncated, corrupt, holds something other than tensors, or (for
            pickles) anything that a weights-only load refuses.
    """
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch warns before raising; the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False: exactly what must not be done with an untrusted file
        raise CorruptCheckpointError(
            "refused by weights-only loading: it holds objects other than tensors (possibly code); "
            "re-save it as safetensors in a trusted environment",
            path=path,
        ) from exc
    except Exception as exc:  # torch raises a zoo of types for bad files; all mean "cannot read this file"
        raise CorruptCheckpointError(f"cannot be read as a torch checkpoint ({first_line(exc)})", path=path) from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CorruptCheckpointError("expected a flat {name: tensor} state dict", path=path)
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"corrupt or truncated safetensors file ({first_line(exc)})", path=path) from exc
