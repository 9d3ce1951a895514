"""One ``transformers.Trainer`` run (a phase): arguments from the options, logs and progress on stderr, and the
numbers the benchmarks need (step times, tokens, trainable parameters).

Three things the plain Trainer gets wrong for us are set right here, in :class:`PhaseTrainer`:

- AdaLoRA's orthogonality penalty. PEFT adds ``orth_reg_weight · R`` to the loss of every micro-batch, while the
  Trainer (for models that take ``num_items_in_batch``) no longer divides the loss by the accumulation steps and
  multiplies it by the world size: the effective weight was ``orth_reg_weight × grad_accum × world``. Under FSDP
  PEFT's penalty even fails (it multiplies the sharded ``lora_A`` / ``lora_B`` outside the layers' forward). The
  model is called without labels instead (so PEFT adds nothing), its own loss function computes the causal-LM
  loss, and the penalty is added here, once per optimizer step, on whole tensors.
- FSDP on CPU. accelerate 1.15 maps a CPU ``torchrun`` to ``MULTI_CPU`` and drops the Trainer's FSDP plugin
  without a word: ``fsdp`` trains as DDP. The state is set to FSDP with that same plugin, so that accelerate's
  own FSDP2 path (``fully_shard`` over the gloo group) runs; on GPUs accelerate does this itself.
- FSDP's gradient reduction. accelerate reduces in the training dtype (bf16 / fp16), so AdaLoRA's importance
  scores and LoRA-Drop's pilot would read gradients rounded differently from DDP's (which reduces float32
  gradients): FSDP reduces in float32 here.
- LoRA-Drop's shared LoRA under FSDP. One ``lora_A`` / ``lora_B`` used by several decoder layers cannot belong to
  several shard units: it is left out of sharding (replicated, a few MB at most) and its gradient is averaged
  over the processes here, before clipping and the optimizer step, as DDP would.
- The launcher's mixed precision. ``accelerate launch`` passes its own (``--mixed_precision``, or the one in an
  ``accelerate config``), which the Trainer takes over when neither bf16 nor fp16 is asked for: ``precision``
  decides alone, so that ``accelerate launch`` and ``torchrun`` train the same way.
- Gradient checkpointing is enabled on the model (non-reentrant), not through ``TrainingArguments`` (whose
  ``gradient_checkpointing`` later transformers 5 releases deprecate), and without making the embedding output
  require a gradient: non-reentrant checkpointing does not need it, and with it the backward pass runs through
  every layer, also those without an adapter (LoRA-Drop ``drop``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from adaconvert.errors import InvalidConfigError
from adaconvert.training.adalora import adalora_peft_config, orthogonality_penalty
from adaconvert.training.checkpoints import KEPT, PhaseCheckpoints, load_state, save_state
from adaconvert.training.config import TrainOptions, optimizer_steps
from adaconvert.training.data import CausalCollator
from adaconvert.training.heldout import EvalCurve, token_loss_step, token_weighted_metrics
from adaconvert.training.sharding import adapter_state_dict, average_gradients, shared_modules, world_size

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
    eval_curve: list[dict] = field(default_factory=list)  # [{"step", "loss"}]: held-out loss, token-weighted
    eval_s: float = 0.0  # of wall_s, spent measuring the held-out loss

    @property
    def median_step_s(self) -> float:
        times = sorted(self.step_times[1:] or self.step_times)
        return times[len(times) // 2] if times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of training (held-out evaluations left out of both)."""
        seconds = self.wall_s - self.eval_s
        return self.tokens / seconds if seconds > 0 else float("nan")


class StepClock(TrainerCallback):
    """Times each optimizer step, from the previous step's end (or the start of training).

    Args:
        sync: wait for the GPU at every step, so that each time is the step's own (benchmarks). Off, the times are
            host-side and a step's GPU work may be counted in the next one, but no step waits for the device.
    """

    def __init__(self, *, sync: bool = False):
        self.times: list[float] = []
        self.sync = sync and torch.cuda.is_available()
        self._last = 0.0

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.times.append(now - self._last)
        self._last = now


def run_phase(
    model,
    dataset,
    tokenizer,
    opts: TrainOptions,
    *,
    precision: str,
    callbacks=(),
    steps=None,
    desc: str = "train",
    checkpoints: PhaseCheckpoints | None = None,
    eval_dataset=None,
):
    """One ``Trainer`` run of ``model`` on ``dataset``; ``steps`` overrides ``opts.steps``. With ``checkpoints``
    it saves every ``save_steps`` optimizer steps there, and resumes from ``resume_from``. With ``eval_dataset``
    the Trainer measures the held-out loss every ``opts.eval_steps`` optimizer steps (default: a tenth of the run)
    and at the end, token-weighted (:mod:`adaconvert.training.heldout`), into ``PhaseStats.eval_curve``.

    Returns:
        (PhaseStats, world size).
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    steps = opts.steps if steps is None else steps
    world = world_size()
    total = optimizer_steps(replace(opts, steps=steps), len(dataset), world)
    collator = _CountingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    clock = StepClock(sync=opts.time_steps)
    curve = EvalCurve()
    evaluating = {}
    if eval_dataset is not None:
        evaluating = {
            "eval_strategy": "steps",
            "eval_steps": opts.eval_steps or max(1, total // 10),
            "per_device_eval_batch_size": opts.batch_size,
        }
    if opts.gradient_checkpointing:
        enable_checkpointing(model)
    saving = checkpoints is not None and checkpoints.save_steps is not None
    with (
        tempfile.TemporaryDirectory(prefix="adaconvert-train-")
        if checkpoints is None
        else contextlib.nullcontext(str(checkpoints.directory)) as scratch
    ):
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
            # FSDP2 (accelerate's plugin): one shard unit per decoder layer (the model's _no_split_modules) and the
            # root; parameters are gathered for each unit's forward and backward and resharded after. When only the
            # main process loaded the base, sharding broadcasts its weights (the others hold zeros)
            fsdp=opts.fsdp or None,
            # only the main process loaded the base (the others hold it on the meta device): sharding broadcasts its
            # weights, each process keeping its shard. Activation checkpointing is the model's own
            # (enable_checkpointing), never also FSDP's (accelerate's fsdp_activation_checkpointing becomes
            # --gradient-checkpointing in train())
            fsdp_config={
                "version": 2,
                "reshard_after_forward": True,
                "cpu_ram_efficient_loading": True,
                "cpu_offload": opts.fsdp_offload_params,
                "activation_checkpointing": False,
            }
            if opts.fsdp
            else None,
            logging_steps=opts.logging_steps,
            save_strategy="steps" if saving else "no",
            save_steps=checkpoints.save_steps if saving else None,
            save_total_limit=KEPT,
            report_to="none",
            seed=opts.seed,
            disable_tqdm=opts.quiet,
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,
            # without use_cpu, accelerate treats a CPU torchrun as non-distributed: no DDP, no gradient all-reduce
            use_cpu=not torch.cuda.is_available(),
            ddp_backend=None if torch.cuda.is_available() or world == 1 else "gloo",
            dataloader_pin_memory=torch.cuda.is_available(),
            **evaluating,
        )
        args.mixed_precision = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")  # not the launcher's
        trainer = PhaseTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            callbacks=[clock, curve, *callbacks],
            compute_metrics=token_weighted_metrics if eval_dataset is not None else None,
        )
        # Trainer prints its logs on stdout, where our results go: log them, and show progress on stderr instead
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Progress(quiet=opts.quiet, desc=desc))
        resume_from = checkpoints.resume_from if checkpoints is not None else None
        if resume_from is not None:
            trainer.load_states(resume_from)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        wall = time.perf_counter() - started
        # accelerate left bf16 / fp16 autocast wrapped around the model's forward: what the caller gets back (and
        # what is compared with the saved adapter) is the plain model again
        trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
    stats = PhaseStats(
        trainable_params=count_trainable(model),
        optimizer_steps=trainer.state.global_step,
        step_times=clock.times,
        tokens=collator.tokens,
        train_loss=float(output.training_loss),
        wall_s=wall,
        eval_curve=curve.points,
        eval_s=trainer.eval_s,
    )
    return stats, args.world_size


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing on the base model, the embedding output left without a gradient.

    ``gradient_checkpointing_enable`` (and PEFT, for a base that already checkpoints) hook the embedding so that
    its output requires a gradient, which only reentrant checkpointing needs; with it, autograd runs the backward
    through every layer down to the embedding, even those that hold no adapter.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()


class PhaseTrainer(Trainer):
    """``transformers.Trainer`` with AdaLoRA's orthogonality penalty added once per optimizer step, FSDP kept on
    CPU processes, reducing in float32 and leaving LoRA-Drop's shared LoRA replicated (see the module docstring)."""

    def __init__(self, *args, model=None, **kwargs):
        self.shared = shared_modules(model)
        if adalora_peft_config(model) is not None:
            # the model is called without labels, so PEFT's AdaLoraModel adds no penalty of its own: the
            # causal-LM loss is the model's own loss function, the penalty is added in compute_loss
            kwargs["compute_loss_func"] = self._causal_lm_loss
        super().__init__(*args, model=model, **kwargs)
        self.eval_s = 0.0

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation, timed, its batches left out of the collator's count of training tokens."""
        started, counting = time.perf_counter(), self.data_collator.counting
        self.data_collator.counting = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator.counting = counting
            self.eval_s += time.perf_counter() - started

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if self.accelerator.mixed_precision != "no":  # as accelerate's state does with the plugin it keeps
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            self.accelerator.state.fsdp_plugin = plugin
            self.accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin = self.accelerator.state.fsdp_plugin
            policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
            plugin.mixed_precision_policy = replace(policy, reduce_dtype=torch.float32)
            if self.shared:  # LoRA-Drop share: left out of every shard unit, averaged in training_step
                plugin.ignored_modules = self.shared
        if self.is_fsdp_enabled and self.args.fsdp_config.get("cpu_offload") and not torch.cuda.is_available():
            from torch.distributed.fsdp import CPUOffloadPolicy

            # offloading to the CPU on a CPU keeps the shards where they are; pinning needs a GPU
            self.accelerator.state.fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.is_fsdp_enabled and self.shared:
            # FSDP turns every other parameter into a DTensor, and one fused AdamW call cannot take both kinds
            _own_param_groups(optimizer, {id(p) for module in self.shared for p in module.parameters()})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.is_fsdp_enabled and self.shared and self.accelerator.sync_gradients:
            average_gradients(p for module in self.shared for p in module.parameters())
        return loss

    # checkpoints (--save-steps, --resume): the adapter's whole tensors and the callbacks' state, beside the Trainer's
    # optimizer, scheduler and RNG state (adaconvert/training/checkpoints.py)

    def _save(self, output_dir=None, state_dict=None):
        """The model part of a checkpoint: the adapter's whole, full-rank tensors (not PEFT's save, which cuts
        AdaLoRA's tensors to the kept ranks)."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._adapter = adapter_state_dict(self.model)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            states, tensors = {}, {f"adapter/{k}": v for k, v in self._adapter.items()}
            for callback in self._stateful():
                state, own = callback.checkpoint_state()
                states[type(callback).__name__] = state
                tensors.update({f"{type(callback).__name__}/{k}": v for k, v in own.items()})
            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_state(folder, tensors, states)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer loads the model part itself at the start of a resumed run: :meth:`load_states` did."""

    def load_states(self, checkpoint: Path) -> None:
        """The adapter's tensors and the callbacks' state of ``checkpoint`` (every process reads them)."""
        tensors, states = load_state(checkpoint)
        adapter = {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
        with torch.no_grad():
            missing = set(adapter) - set(self.model.state_dict())
            if missing:
                raise InvalidConfigError(f"the checkpoint's adapter does not fit this model ({sorted(missing)[0]})")
            self.model.load_state_dict(adapter, strict=False)
        for callback in self._stateful():
            name = type(callback).__name__
            own = {k.removeprefix(f"{name}/"): v for k, v in tensors.items() if k.startswith(f"{name}/")}
            callback.load_checkpoint_state(states[name], own)

    def _stateful(self):
        return [cb for cb in self.callback_handler.callbacks if hasattr(cb, "checkpoint_state")]

    def _causal_lm_loss(self, outputs, labels, num_items_in_batch=None):
        base = self.accelerator.unwrap_model(self.model).get_base_model()
        return base.loss_function(
            outputs.logits,
            labels,
            vocab_size=base.config.get_text_config().vocab_size,
            num_items_in_batch=num_items_in_batch,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The held-out loss's step: per-example loss sums and token counts (:func:`token_loss_step`)."""
        return token_loss_step(self, model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        config = adalora_peft_config(self.model)
        if config is None or config.orth_reg_weight == 0:
            return result
        # with a compute_loss_func the Trainer does not divide the loss by the accumulation steps (the loss is
        # normalised by num_items_in_batch, the tokens of the whole optimizer step): the penalty gets its share.
        # Every process adds the same penalty and gradients are averaged over processes: no world-size factor.
        penalty = config.orth_reg_weight / self.current_gradient_accumulation_steps * orthogonality_penalty(self.model)
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty


def _own_param_groups(optimizer, params: set[int]) -> None:
    """Move the parameters whose ids are in ``params`` into param groups of their own, with the same settings
    (weight decay, learning rate) as the groups they leave; before the first step (no optimizer state yet)."""
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in params]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in params]
            optimizer.add_param_group({**group, "params": moved})


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
        self.counting = True  # off while the Trainer evaluates (same collator, held-out batches)

    def __call__(self, features):
        batch = super().__call__(features)
        if self.counting:
            self.tokens += int(batch["attention_mask"].sum())
        return batch


def count_trainable(model) -> int:
    """Trainable parameters, each counted once even when shared by several modules (``parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
