"""Checkpoints of a long run (``--save-steps N``) and ``--resume``.

A run's checkpoint directory (``OUTPUT.checkpoints`` unless ``--resume DIR`` names another) holds:

- ``run.json``: the options that decide what is trained (a resume with other ones is refused);
- one folder per phase (``train``; LoRA-Drop: ``pilot`` then ``train``) of HF Trainer checkpoints
  (``checkpoint-<step>``: optimizer, scheduler, RNG and Trainer state), each with our own state beside it:
  the adapter's whole, full-rank tensors (PEFT's own save cuts AdaLoRA's tensors to the kept ranks, which a
  resumed run could not continue from) and the state of the callbacks that have one (AdaLoRA's budget: counters,
  rank pattern, shortened schedule, and the importance EMAs PEFT's allocator keeps);
- ``lora_drop_selection.json``: once LoRA-Drop's pilot is done, the selection and its record, so that a resume
  goes straight to the main run.

Our state file is written last: a checkpoint without it (a crash while saving) is not resumed from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from adaconvert.constants import (
    CHECKPOINT_RUN_NAME,
    CHECKPOINT_SELECTION_NAME,
    CHECKPOINT_STATE_NAME,
    CHECKPOINT_TENSORS_NAME,
    CHECKPOINTS_SUFFIX,
)
from adaconvert.errors import InvalidConfigError, OutputExistsError, SourceNotFoundError
from adaconvert.training.config import RESUME_LATEST, TrainOptions

# options that do not change what is trained: a resume may give other values
FREE_OPTIONS = frozenset({"output", "overwrite", "quiet", "logging_steps", "save_steps", "resume", "time_steps"})
KEPT = 2  # checkpoints kept per phase (the Trainer removes older ones)


@dataclass(frozen=True)
class PhaseCheckpoints:
    """Where one phase saves its checkpoints (every ``save_steps``, or never) and which one it resumes from."""

    directory: Path
    save_steps: int | None
    resume_from: Path | None


@dataclass(frozen=True)
class RunCheckpoints:
    """A run's checkpoint directory."""

    root: Path
    save_steps: int | None
    resuming: bool

    @classmethod
    def of(cls, opts: TrainOptions) -> RunCheckpoints | None:
        """The checkpoints of the run ``opts`` describes; ``None`` when it neither saves nor resumes."""
        if opts.save_steps is None and opts.resume is None:
            return None
        root = opts.resume if opts.resume not in (None, RESUME_LATEST) else opts.output + CHECKPOINTS_SUFFIX
        return cls(Path(root), opts.save_steps, opts.resume is not None)

    def check(self, opts: TrainOptions, world: int) -> None:
        """Before anything is loaded (main process): a resume needs the directory and the same options; a new run
        needs no earlier checkpoints (``overwrite`` removes them).

        Raises:
            SourceNotFoundError: nothing to resume from.
            InvalidConfigError: the resumed run was started with other options or another number of processes.
            OutputExistsError: a new run would mix its checkpoints with an earlier run's.
        """
        record = self.root / CHECKPOINT_RUN_NAME
        if self.resuming:
            if not record.is_file():
                raise SourceNotFoundError("no checkpoints to resume from (train with --save-steps)", path=self.root)
            saved = json.loads(record.read_text(encoding="utf-8"))
            current = _run_record(opts, world)
            differ = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
            if differ:
                raise InvalidConfigError(
                    "--resume: options differ from the interrupted run's: "
                    + ", ".join(f"{k} {saved.get(k)!r} → {current.get(k)!r}" for k in differ),
                    path=self.root,
                )
        elif self.root.exists():
            if not opts.overwrite:
                raise OutputExistsError(
                    "checkpoints of an earlier run are there; pass --resume to continue it, or --overwrite to start "
                    "over",
                    path=self.root,
                )
            shutil.rmtree(self.root)

    def start(self, opts: TrainOptions, world: int) -> None:
        """Record the run's options (main process, new runs)."""
        if not self.resuming:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(self.root / CHECKPOINT_RUN_NAME, _run_record(opts, world))

    def phase(self, name: str) -> PhaseCheckpoints:
        """Phase ``name``'s checkpoints, resuming from its latest complete one when this run resumes."""
        directory = self.root / name
        return PhaseCheckpoints(directory, self.save_steps, latest_checkpoint(directory) if self.resuming else None)

    def save_selection(self, selection: dict) -> None:
        _write_json(self.root / CHECKPOINT_SELECTION_NAME, selection)

    def selection(self) -> dict | None:
        """LoRA-Drop's saved selection, when this run resumes after its pilot."""
        path = self.root / CHECKPOINT_SELECTION_NAME
        return json.loads(path.read_text(encoding="utf-8")) if self.resuming and path.is_file() else None


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` of ``directory`` with the highest step, or ``None``."""
    complete = [p for p in directory.glob("checkpoint-*") if (p / CHECKPOINT_STATE_NAME).is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def save_state(directory: Path, tensors: dict, states: dict) -> None:
    """Our part of a checkpoint: ``tensors`` (name → tensor) and ``states`` (callback name → JSON), the JSON last."""
    from safetensors.torch import save_file

    # copies: safetensors refuses tensors that share memory (LoRA-Drop's shared LoRA under several names)
    copies = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    save_file(copies, directory / CHECKPOINT_TENSORS_NAME)
    _write_json(directory / CHECKPOINT_STATE_NAME, states)


def load_state(directory: Path) -> tuple[dict, dict]:
    """(tensors, states) of :func:`save_state`."""
    from safetensors.torch import load_file

    states = json.loads((directory / CHECKPOINT_STATE_NAME).read_text(encoding="utf-8"))
    return load_file(directory / CHECKPOINT_TENSORS_NAME), states


def _run_record(opts: TrainOptions, world: int) -> dict:
    return {**{k: v for k, v in opts.to_dict().items() if k not in FREE_OPTIONS}, "world_size": world}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
