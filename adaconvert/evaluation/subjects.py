"""What ``eval`` compares: the base alone, adapters on it, merged models; each checked against the base first.

An adapter made for another base would load in vLLM with its modules silently ignored (base outputs), and a merged
model of another architecture would be scored with the wrong tokenizer: both are refused before any model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from adaconvert.base.model import BaseModel
from adaconvert.constants import CONVERSION_REPORT_NAME, MODEL_CONFIG_NAME, TRAINING_SUMMARY_NAME
from adaconvert.errors import AdaconvertError, BaseMismatchError
from adaconvert.evaluation.metrics import adapter_parameters
from adaconvert.io.checkpoint import open_checkpoint
from adaconvert.io.location import require_source
from adaconvert.io.source import read_json, resolve_source

logger = logging.getLogger(__name__)

BASE, ADAPTER, MERGED = "base", "adapter", "merged"


@dataclass
class Subject:
    """One row of the comparison.

    Attributes:
        label: the row's name (the directory name; ``base`` for the base alone), unique.
        kind: ``base``, ``adapter`` or ``merged``.
        path: the adapter or merged directory (None for the base).
        method: ``base``, ``lora``, ``adalora``, ``lora-drop`` or ``merged``; a ``to-lora`` output is ``lora``
            with ``converted_from`` set.
        converted_from: the method a ``to-lora`` output was converted from (its conversion report), else None.
        parameters: parameters in the adapter file (:func:`adapter_parameters`); 0 for the base, None for a merge.
        trained_parameters: trainable parameters of the training run, pilot excluded (``training_summary.json``
            of an ``adaconvert train`` output), else None. LoRA-Drop's shared LoRA is one trained copy written
            once per layer, so this may be smaller than ``parameters``.
    """

    label: str
    kind: str
    path: Path | None = None
    method: str = BASE
    converted_from: str | None = None
    parameters: int | None = 0
    trained_parameters: int | None = None


def resolve_subjects(base: BaseModel, adapters, merged) -> list[Subject]:
    """The base row, then one row per adapter and per merged directory, each checked against ``base``.

    Raises:
        SourceNotFoundError: an adapter or merged directory does not exist.
        BaseMismatchError: an adapter has a module the base lacks or of another shape; a merged model is another
            architecture or has other tensors than the base.
        plus the readers' errors for an adapter that cannot be read (naming it).
    """
    for src in (*adapters, *merged):
        require_source(src)
    subjects = [Subject("base", BASE)]
    labels = {"base"}
    for src in adapters:
        subjects.append(_adapter_subject(src, base, _label(src, labels)))
    for src in merged:
        _check_merged(src, base)
        subjects.append(Subject(_label(src, labels), MERGED, Path(src), method=MERGED, parameters=None))
    return subjects


def _label(src, taken: set[str]) -> str:
    name = Path(src).name or str(src)
    label, n = name, 1
    while label in taken:
        n += 1
        label = f"{name}#{n}"
    taken.add(label)
    return label


def _adapter_subject(src, base: BaseModel, label: str) -> Subject:
    from adaconvert.readers import read_adapter

    root = resolve_source(src)
    adapter = read_adapter(root)
    modules = base.modules
    for name, delta in sorted(adapter.deltas.items()):
        layer = modules.get(name)
        if layer is None:
            raise BaseMismatchError(
                f"module {name} of the adapter is not in the base model {base.source}: it was made for another base",
                path=src,
            )
        if layer.kind != "embedding" and (delta.in_features, delta.out_features) != (
            layer.in_features,
            layer.out_features,
        ):
            raise BaseMismatchError(
                f"module {name} is {delta.out_features}×{delta.in_features} in the adapter but "
                f"{layer.out_features}×{layer.in_features} in the base model {base.source}: it was made for "
                "another base",
                path=src,
            )
    converted_from = _json_field(root / CONVERSION_REPORT_NAME, "source_kind")
    trained = _json_field(root / TRAINING_SUMMARY_NAME, "trainable_params")
    return Subject(
        label,
        ADAPTER,
        root,
        method=adapter.source_kind,
        converted_from=converted_from,
        parameters=adapter_parameters(root),
        trained_parameters=trained if isinstance(trained, int) else None,
    )


def _json_field(path: Path, key: str):
    """``key`` of a JSON file we wrote (top level, else under ``main``); None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except AdaconvertError:
        return None
    return data.get(key, (data.get("main") or {}).get(key) if isinstance(data.get("main"), dict) else None)


def _check_merged(src, base: BaseModel) -> None:
    """A merged model must be the base's architecture with the base's tensors (names and shapes)."""
    root = Path(src)
    if not (root / MODEL_CONFIG_NAME).is_file():
        raise BaseMismatchError(f"not a model directory (no {MODEL_CONFIG_NAME})", path=src)
    theirs = read_json(root / MODEL_CONFIG_NAME).get("model_type")
    ours = getattr(base.config, "model_type", None)
    if theirs != ours:
        raise BaseMismatchError(
            f"the merged model is a {theirs!r} model and the base {base.source} a {ours!r} model: it was not merged "
            "into this base",
            path=src,
        )
    merged_shapes = {n: t.shape for n, t in open_checkpoint(root).tensors.items()}
    base_shapes = {n: t.shape for n, t in base.checkpoint.tensors.items()}
    for name in sorted(set(merged_shapes) | set(base_shapes)):
        if merged_shapes.get(name) != base_shapes.get(name):
            raise BaseMismatchError(
                f"tensor {name} is {merged_shapes.get(name) or 'missing'} in the merged model and "
                f"{base_shapes.get(name) or 'missing'} in the base {base.source}: it was not merged into this base",
                path=src,
            )
