"""The one in-memory representation every reader produces and every writer consumes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from adaconvert.constants import OUTPUT_DTYPES
from adaconvert.errors import InvalidConfigError

_LAYER_RE = re.compile(r"\.(\d+)\.")


class LowRankDelta:
    """A weight update ΔW = B @ A with every scaling folded in.

    Attributes:
        A: (r, in_features), float32.
        B: (out_features, r), float32.

    ΔW has shape (out_features, in_features) in the nn.Linear convention; a Conv1D base (``fan_in_fan_out``)
    stores the transpose, which is the writer's and merger's business, not this class's.

    A reader builds it with :meth:`folding`: the factors as saved (views of the file), the components to keep and
    the scaling, applied when ``A`` or ``B`` is first read. A writer reads :meth:`rows` instead, block by block, so
    that the folded factors never exist whole in memory: building them costs a page fault per 4 KiB of new memory
    (about 60 ms of a 200 ms export of an 8B-shaped AdaLoRA), writing them from a few MiB at a time does not.
    """

    __slots__ = ("_A", "_B", "_keep", "_rank", "_saved_A", "_saved_B", "_scale", "bound")

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self._A, self._B = A, B
        self._saved_A = self._saved_B = self._keep = self._scale = self._rank = None
        # no entry of A or B has a larger magnitude (a reader's checks set it from max|A|, and max|B| · max|scale|:
        # float rounding is monotonic); lets a writer skip a range check (float16's) the factors pass anyway. None:
        # not known
        self.bound: float | None = None

    @classmethod
    def folding(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: torch.Tensor | float,
        keep: torch.Tensor | None = None,
    ) -> LowRankDelta:
        """The delta ``B[:, keep] · scale[keep] @ A[keep]``, computed in float32 when read.

        Args:
            A: (r, in) and B: (out, r) as saved, any floating dtype; never written to.
            scale: a float, or an (r,) float32 vector (one scale per component).
            keep: (k,) indices of the components to keep, in order; None keeps all r.
        """
        delta = cls(None, None)
        if keep is not None and len(keep) == A.shape[0]:
            keep = None
        if keep is not None and isinstance(scale, torch.Tensor):
            scale = scale.index_select(0, keep)
        delta._saved_A, delta._saved_B, delta._scale, delta._keep = A, B, scale, keep
        delta._rank = A.shape[0] if keep is None else len(keep)  # an int: writers ask for it per block
        return delta

    @property
    def A(self) -> torch.Tensor:
        if self._A is None:
            self._A = self.rows("A", 0, self.rank)
        return self._A

    @property
    def B(self) -> torch.Tensor:
        if self._B is None:
            self._B = self.rows("B", 0, self.out_features)
        return self._B

    def rows(self, part: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``A`` (``part`` ``"A"``) or ``B`` (``"B"``), float32, with the values ``A`` and
        ``B`` hold (the same operations, row by row): a view when nothing is left to compute, else new memory, or
        ``out`` (a float32 (stop - start, cols) tensor, any strides) when one is given, which is returned."""
        done = self._A if part == "A" else self._B
        if done is not None:
            return done[start:stop] if out is None else out.copy_(done[start:stop])
        keep = self._keep
        if part == "A":
            saved = self._saved_A
            rows = saved[start:stop] if keep is None else saved.index_select(0, keep[start:stop])
            return rows.float() if out is None else out.copy_(rows)
        rows = self._saved_B[start:stop]
        if keep is None:
            return _scaled(rows, self._scale, out)
        return _scaled(rows.index_select(1, keep), self._scale, out, owned=True)

    def columns(self, part: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Columns ``start:stop`` of ``A`` or ``B`` as the rows of its transpose, (stop - start, rows of the
        factor), float32, with the values :meth:`rows` gives: into ``out`` when one is given, as there."""
        done = self._A if part == "A" else self._B
        if done is not None:
            return done[:, start:stop].T if out is None else out.copy_(done[:, start:stop].T)
        keep = self._keep
        if part == "A":
            saved = self._saved_A[:, start:stop]
            columns = (saved if keep is None else saved.index_select(0, keep)).T
            return columns.float() if out is None else out.copy_(columns)
        # B's columns are the components: each one times its own scale
        scale = self._scale[start:stop, None] if isinstance(self._scale, torch.Tensor) else self._scale
        if keep is None:
            return _scaled(self._saved_B[:, start:stop].T, scale, out)
        return _scaled(self._saved_B.index_select(1, keep[start:stop]).T, scale, out, owned=True)

    def is_view(self, part: str) -> bool:
        """Whether :meth:`rows` of ``part`` are views of memory that exists already: nothing to compute."""
        if (self._A if part == "A" else self._B) is not None:
            return True
        return part == "A" and self._keep is None and self._saved_A.dtype == torch.float32

    def factor(self, part: str) -> Factor:
        """``A`` (``part`` ``"A"``) or ``B`` (``"B"``) to be read in blocks of rows, as writers do."""
        return Factor(self, part)

    def first_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, 0], B[0, :])``, each (r,) float32, without building ``A`` or ``B`` (the components' first
        look: ``transforms.strip``)."""
        if self._A is not None:
            first_a = self._A[:, 0]
        else:
            first_a = self._saved_A[:, 0] if self._keep is None else self._saved_A[:, 0].index_select(0, self._keep)
        return first_a.float(), self.rows("B", 0, 1)[0].float()

    @property
    def rank(self) -> int:
        return self._A.shape[0] if self._A is not None else self._rank

    @property
    def in_features(self) -> int:
        return (self._A if self._A is not None else self._saved_A).shape[1]

    @property
    def out_features(self) -> int:
        return (self._B if self._B is not None else self._saved_B).shape[0]

    @property
    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW, (out_features, in_features). For tests and small checks; O(out·in) memory."""
        return self.B @ self.A


def _scaled(
    factor: torch.Tensor, scale: torch.Tensor | float, out: torch.Tensor | None, *, owned: bool = False
) -> torch.Tensor:
    """``factor.float() * scale`` (float32), into ``out`` when one is given; ``owned``: ``factor`` is a copy of
    its own (from ``index_select``), which may be scaled in place."""
    if out is not None:
        if factor.dtype == torch.float32:
            return torch.mul(factor, scale, out=out)
        return out.copy_(factor).mul_(scale)
    if factor.dtype == torch.float32 and not owned:
        return factor * scale  # never in place: float() of float32 saved rows is the file's view
    return factor.float().mul_(scale)


class Factor(NamedTuple):
    """One factor of a :class:`LowRankDelta`, or its transpose, read block by block: ``shape`` (rows, cols) and
    ``rows(start, stop)`` (float32), without building the whole factor unless it already exists."""

    delta: LowRankDelta
    part: str  # "A" or "B"
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        d = self.delta
        rows, cols = (d.rank, d.in_features) if self.part == "A" else (d.out_features, d.rank)
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def T(self) -> Factor:
        """The transpose, read block by block as well (mlx-lm's ``lora_a`` = Aᵀ, ``lora_b`` = Bᵀ)."""
        return self._replace(transposed=not self.transposed)

    @property
    def view(self) -> bool:
        """Whether :meth:`rows` returns views of memory that exists already (nothing is computed)."""
        return self.delta.is_view(self.part)

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        read = self.delta.columns if self.transposed else self.delta.rows
        return read(self.part, start, stop, out)

    def whole(self) -> torch.Tensor:
        """The whole factor, float32, for a writer that needs it at once (to permute or quantise it): not kept
        by the delta, so that its memory serves the next module's (a view when the delta holds it already)."""
        return self.rows(0, self.shape[0])


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
        pending_checks: the reader's value checks, when it left them running (``read_adapter(...,
            defer_checks=True)``): see :meth:`verify`.
    """

    deltas: dict[str, LowRankDelta]
    fan_in_fan_out: bool = False
    base_model: str | None = None
    task_type: str | None = None
    source_kind: str = "lora"
    provenance: dict = field(default_factory=dict)
    pending_checks: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def verify(self) -> None:
        """Wait for the value checks the reader left running (every entry finite, and every scaling folded into B
        too), raising their error (``NonFiniteError``); at once when there are none."""
        if self.pending_checks is not None:
            self.pending_checks()

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
