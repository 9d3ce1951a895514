"""Locate an adapter (local directory or Hub repo id) and read its config and tensors safely.

Weights are read from ``adapter_model.safetensors`` first, then ``adapter_model.bin`` / ``.pt`` through
``torch.load(weights_only=True)``: a pickled checkpoint never runs code here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import stat
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaconvert.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAMES, MODEL_CONFIG_NAME
from adaconvert.errors import CorruptCheckpointError, InvalidConfigError, SourceNotFoundError, first_line
from adaconvert.io.location import is_hub_id

logger = logging.getLogger(__name__)

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
    if os.path.lexists(path):
        raise SourceNotFoundError(f"is {describe_path(path)}; expected {what}", path=path)
    text = str(src)
    if not is_hub_id(src):
        raise SourceNotFoundError("no such directory", path=path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return fetch(text) if fetch else Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise SourceNotFoundError(
            f"no such local directory, and the Hub could not provide it ({first_line(exc)})", path=text
        ) from exc


def read_json(path: Path, *, error: type[Exception] = InvalidConfigError) -> dict:
    """Parse a JSON object file, however hostile (see :func:`parse_json`).

    Raises:
        SourceNotFoundError: the file does not exist, or is not a regular file (a FIFO is never opened).
        InvalidConfigError (or ``error``): it is not valid JSON or not an object.
    """
    if not path.is_file():
        why = f"is {describe_path(path)}, not a file" if os.path.lexists(path) else "missing file"
        raise SourceNotFoundError(why, path=path)
    data = parse_json(path.read_bytes(), path=path, error=error)
    if not isinstance(data, dict):
        raise error("expected a JSON object", path=path)
    return data


def read_model_config(base: str | Path) -> tuple[dict, Path]:
    """``(config, path)``: the parsed ``config.json`` of a base model directory or Hub model id, and where it was
    read. Only that file is needed: a Hub id downloads it alone (or finds it in the cache).

    Raises:
        SourceNotFoundError: no such directory, no config.json, or the Hub cannot provide it.
        InvalidConfigError: the file is not a JSON object.
    """

    def fetch(repo_id: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, MODEL_CONFIG_NAME)).parent

    root = resolve_source(base, what="a base model directory or Hub model id", fetch=fetch)
    path = root / MODEL_CONFIG_NAME
    if not path.is_file():
        raise SourceNotFoundError(f"no {MODEL_CONFIG_NAME}: expected a base model directory", path=root)
    return read_json(path), path


def parse_json(raw: bytes | str, *, path: str | Path, error: type[Exception] = InvalidConfigError):
    """``json.loads(raw)``, every failure one line naming ``path``: bad syntax or encoding, nesting deeper than the
    interpreter's recursion limit, integers longer than its int-string limit (4300 digits by default).

    Raises:
        InvalidConfigError (or ``error``, an :class:`AdaconvertError` class).
    """
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"not valid JSON ({first_line(exc)})", path=path) from exc
    except RecursionError as exc:
        raise error("JSON nested too deeply to parse", path=path) from exc
    except ValueError as exc:  # int-string conversion limit
        limit = sys.get_int_max_str_digits()
        raise error(f"JSON holds a number too long to parse (over {limit} digits)", path=path) from exc


def describe_path(path: Path) -> str:
    """What is at ``path``, for messages: ``a directory``, ``a FIFO``, ``a symlink loop``, ``a dangling symlink``..."""
    try:
        mode = path.stat().st_mode
    except RuntimeError:  # pathlib on a symlink loop (Python < 3.13)
        return "a symlink loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling symlink" if path.is_symlink() else f"unreadable ({exc.strerror})"
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a regular file")


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
    config_path = root / ADAPTER_CONFIG_NAME
    config = read_json(config_path)
    return AdapterFiles(root, config, config_path, weights_file(root))


def weights_file(root: Path) -> Path:
    """The adapter weights file in ``root``, in the order PEFT and vLLM look: safetensors first, then .bin / .pt.

    Raises:
        SourceNotFoundError: there is none.
    """
    for name in ADAPTER_WEIGHTS_NAMES:
        path = root / name
        if path.is_file():
            return path
        if os.path.lexists(path):  # never opened: a FIFO would block, a directory or a loop cannot be read
            raise CorruptCheckpointError(f"is {describe_path(path)}, not a weights file", path=path)
    raise SourceNotFoundError(f"no adapter weights (looked for {', '.join(ADAPTER_WEIGHTS_NAMES)})", path=root)


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
    for key, tensor in obj.items():
        # a pickle gives each tensor a size and strides over a storage; stride 0 makes a few bytes look like
        # gigabytes, which the first copy would materialise
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise CorruptCheckpointError(
                f"tensor {key!r} of shape {list(tensor.shape)} needs {tensor.numel() * tensor.element_size():,} "
                f"bytes but its storage holds {tensor.untyped_storage().nbytes():,} bytes (expanded with stride 0?)",
                path=path,
            )
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, in safetensors' key order, each a view of one private (copy-on-write) mapping of the file.

    safetensors checks the header when it opens the file (its errors are the ones users see); the tensors are then
    views of one mapping (:func:`_mapped_tensors`), not ``get_tensor`` calls: ~45 µs each, 30 ms of the 672
    tensors of an 8B adapter. Where a view cannot be made, ``get_tensor`` reads them as before.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            mapped = _mapped_tensors(path, keys)
            return mapped if mapped is not None else {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"corrupt or truncated safetensors file ({first_line(exc)})", path=path) from exc


def _mapped_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """``{key: tensor}`` over one ``MAP_PRIVATE`` mapping of ``path`` (what ``get_tensor`` maps, once per tensor),
    from our own check of its header; None when that check refuses the file, names other tensors than ``keys``
    (the file changed since it was opened), or a tensor starts at an offset that is not a multiple of its
    element size (a view must be aligned; ``get_tensor`` copies those)."""
    from adaconvert.io.checkpoint import read_header

    try:
        infos = read_header(path)
    except CorruptCheckpointError:
        return None
    if infos.keys() != set(keys) or any(i.offset % i.dtype.itemsize for i in infos.values()):
        return None
    if not infos:
        return {}
    end = max(i.offset + i.nbytes for i in infos.values())  # the file's size, as checked
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=end)
    return {
        key: torch.empty(0, dtype=(i := infos[key]).dtype).set_(storage, i.offset // i.dtype.itemsize, i.shape)
        for key in keys
    }
