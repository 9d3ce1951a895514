"""The one in-memory representation every reader produces and every writer consumes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from adaconvert.constants import OUTPUT_DTYPES
from adaconvert.errors import InvalidConfigError

_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LowRankDelta:
    """A weight update ΔW = B @ A with every scaling already folded in.

    Attributes:
        A: (r, in_features), float32.
        B: (out_features, r), float32.

    ΔW has shape (out_features, in_features) in the nn.Linear convention; a Conv1D base (``fan_in_fan_out``)
    stores the transpose, which is the writer's and merger's business, not this class's.
    """

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW, (out_features, in_features). For tests and small checks; O(out·in) memory."""
        return self.B @ self.A


@dataclass
class Adapter:
    """A LoRA-family adapter, normalised: per-module low-rank deltas with scaling folded in.

    Attributes:
        deltas: module name inside the base model (``model.layers.0.self_attn.q_proj``, no ``base_model.model.``
            prefix) → its delta. A module may have rank 0 until ``strip_empty`` removes it.
        fan_in_fan_out: the base layers store weights as (in, out) (GPT-2's Conv1D).
        base_model: ``base_model_name_or_path`` of the source, if known.
        task_type: PEFT ``task_type`` of the source (``CAUSAL_LM``...), kept on export.
        source_kind: ``adalora``, ``lora`` or ``lora-drop``.
        provenance: what the source said about itself: ranks as stored, init_r, scaling used,
            training metadata (rank history, layer importance).
    """

    deltas: dict[str, LowRankDelta]
    fan_in_fan_out: bool = False
    base_model: str | None = None
    task_type: str | None = None
    source_kind: str = "lora"
    provenance: dict = field(default_factory=dict)

    def replace(self, **changes) -> Adapter:
        """A shallow copy with some fields changed (transforms never mutate their input)."""
        return replace(self, **changes)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: d.rank for name, d in self.deltas.items()}

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)

    @property
    def num_params(self) -> int:
        return sum(d.num_params for d in self.deltas.values())


def split_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, module kind) of a module name: ``model.layers.3.self_attn.q_proj`` → (3, ``self_attn.q_proj``).

    The layer is the first all-digit path component; modules outside the repeated blocks get ``None``.
    """
    m = _LAYER_RE.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end() :]


def output_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--dtype`` name (``float32``, ``float16``, ``bfloat16``); None for None.

    Raises:
        InvalidConfigError: any other name.
    """
    if name is None:
        return None
    if name not in OUTPUT_DTYPES:
        raise InvalidConfigError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {name!r}")
    return getattr(torch, name)
