"""One ``transformers.Trainer`` run (a phase): arguments from the options, logs and progress on stderr, and the
numbers the benchmarks need (step times, tokens, trainable parameters)."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
from transformers import TrainerCallback

from adaconvert.training.config import TrainOptions, optimizer_steps
from adaconvert.training.data import CausalCollator

logger = logging.getLogger(__name__)


@dataclass
class PhaseStats:
    """One Trainer run: what it trained and how fast (per-process numbers; ``step_times`` in seconds per
    optimizer step, first step included)."""

    trainable_params: int
    optimizer_steps: int
    step_times: list[float]
    tokens: int
    train_loss: float
    wall_s: float

    @property
    def median_step_s(self) -> float:
        times = sorted(self.step_times[1:] or self.step_times)
        return times[len(times) // 2] if times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


class StepClock(TrainerCallback):
    """Times each optimizer step (CUDA synchronised), from the previous step's end (or the start of training)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.times.append(now - self._last)
        self._last = now


def run_phase(
    model, dataset, tokenizer, opts: TrainOptions, *, precision: str, callbacks=(), steps=None, desc: str = "train"
):
    """One ``Trainer`` run of ``model`` on ``dataset``; ``steps`` overrides ``opts.steps``.

    Returns:
        (PhaseStats, world size).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    steps = opts.steps if steps is None else steps
    world = world_size()
    total = optimizer_steps(replace(opts, steps=steps), len(dataset), world)
    collator = _CountingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="adaconvert-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=opts.batch_size,
            gradient_accumulation_steps=opts.grad_accum,
            learning_rate=opts.lr,
            max_steps=steps if steps is not None else -1,
            num_train_epochs=opts.epochs if opts.epochs is not None else 1.0,
            lr_scheduler_type=opts.lr_scheduler,
            warmup_steps=int(opts.warmup_ratio * total),
            weight_decay=opts.weight_decay,
            max_grad_norm=opts.max_grad_norm,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            gradient_checkpointing=opts.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
            logging_steps=opts.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=opts.seed,
            disable_tqdm=opts.quiet,
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,
            # without use_cpu, accelerate treats a CPU torchrun as non-distributed: no DDP, no gradient all-reduce
            use_cpu=not torch.cuda.is_available(),
            ddp_backend=None if torch.cuda.is_available() or world == 1 else "gloo",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock, *callbacks]
        )
        # Trainer prints its logs on stdout, where our results go: log them, and show progress on stderr instead
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Progress(quiet=opts.quiet, desc=desc))
        started = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - started
    stats = PhaseStats(
        trainable_params=count_trainable(model),
        optimizer_steps=trainer.state.global_step,
        step_times=clock.times,
        tokens=collator.tokens,
        train_loss=float(output.training_loss),
        wall_s=wall,
    )
    return stats, args.world_size


class _Progress(TrainerCallback):
    """A tqdm bar on stderr (main process, unless quiet) and the Trainer's logs through ``logging``."""

    def __init__(self, *, quiet: bool, desc: str):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, file=sys.stderr, disable=self.quiet, leave=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info("%s step %d: %s", self.desc, state.global_step, {k: _short(v) for k, v in logs.items()})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _short(value):
    return round(value, 4) if isinstance(value, float) else value


class _CountingCollator(CausalCollator):
    """:class:`CausalCollator` that also counts the real (non-padding) tokens it hands out."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of=None):
        super().__init__(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        self.tokens = 0

    def __call__(self, features):
        batch = super().__call__(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def world_size() -> int:
    """Processes of a ``torchrun`` / ``accelerate launch`` run (1 otherwise)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def count_trainable(model) -> int:
    """Trainable parameters, each counted once even when shared by several modules (``parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
