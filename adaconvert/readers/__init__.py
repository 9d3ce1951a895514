"""Readers: one per source kind, each turning a checkpoint directory into an :class:`~adaconvert.adapter.Adapter`.

The registry below is the only place that knows which ``peft_type`` goes to which reader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adaconvert.adapter import Adapter
from adaconvert.errors import InvalidConfigError, UnknownAdapterTypeError
from adaconvert.io.source import AdapterFiles, open_adapter_dir
from adaconvert.readers.adalora import read_adalora
from adaconvert.readers.lora import read_lora

Reader = Callable[[AdapterFiles], Adapter]

READERS: dict[str, Reader] = {}


def register_reader(peft_type: str, reader: Reader) -> None:
    """Add a reader for ``peft_type`` (upper case, as PEFT writes it); a type may be registered once."""
    if peft_type != peft_type.upper() or peft_type in READERS:
        raise ValueError(f"reader for {peft_type!r} must be upper case and registered once")
    READERS[peft_type] = reader


register_reader("ADALORA", read_adalora)
register_reader("LORA", read_lora)


def read_adapter(src: str | Path, *, defer_checks: bool = False) -> Adapter:
    """Read any supported adapter (local directory or Hub repo id) into an :class:`Adapter`.

    Args:
        defer_checks: return while the value checks (every entry finite, every scaling folded into B too: one
            pass over all the data) still run on a thread of their own; the caller calls ``adapter.verify()``
            before anything it made from the values counts (a conversion: before its output is published).

    Raises:
        SourceNotFoundError: no such directory / repo, or files missing.
        UnknownAdapterTypeError: ``peft_type`` is not one of ``READERS``.
        plus the readers' own errors (shape, missing tensors, NaN, corrupt files).

    Example:
        >>> adapter = read_adapter("runs/adalora-7b")
        >>> adapter.ranks["model.layers.0.self_attn.q_proj"]
        12
    """
    files = open_adapter_dir(src)
    peft_type = files.config.get("peft_type")
    if not isinstance(peft_type, str):
        raise InvalidConfigError("missing field 'peft_type'", path=files.config_path)
    reader = READERS.get(peft_type.upper())
    if reader is None:
        raise UnknownAdapterTypeError(
            f"unknown peft_type {peft_type!r}; supported: {', '.join(sorted(READERS))}", path=files.config_path
        )
    adapter = reader(files)
    if not defer_checks:
        adapter.verify()
    return adapter
