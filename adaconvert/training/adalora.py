"""AdaLoRA with the HF ``Trainer``, done right (docs/design.md §2).

``Trainer`` never calls ``update_and_allocate``, so without help PEFT's AdaLoRA never prunes: the ranks stay at
``init_r`` and ``rank_pattern`` stays null. :class:`AdaLoraCallback` calls it once per optimizer step, in
``on_optimizer_step`` (after ``optimizer.step()``, before the gradients are cleared: the importance scores need
them), with the index of that step; under DDP every process sees the same all-reduced gradients and so computes
the same mask. It also records the rank of every module at each budget step (``rank_history.json``).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from adaconvert.training.config import AdaLoraSchedule, TrainOptions, adalora_schedule

logger = logging.getLogger(__name__)

ADAPTER = "default"


def adalora_config(options: TrainOptions, schedule: AdaLoraSchedule, target_modules):
    """The PEFT ``AdaLoraConfig`` for ``options`` and ``schedule`` (task type CAUSAL_LM, so that PEFT adds the
    orthogonality loss to the model's own loss)."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=options.init_r,
        target_r=options.target_r,
        tinit=schedule.tinit,
        tfinal=schedule.tfinal,
        deltaT=schedule.delta_t,
        beta1=options.beta1,
        beta2=options.beta2,
        orth_reg_weight=options.orth_reg_weight,
        total_step=schedule.total_step,
        lora_alpha=options.alpha,
        lora_dropout=options.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def module_ranks(rank_pattern: dict) -> dict[str, int]:
    """{module: kept rank} from a PEFT rank pattern ({``<module>.lora_E[.<adapter>]``: [bool] * init_r})."""
    ranks = {}
    for key, mask in rank_pattern.items():
        module = key.removesuffix(f".{ADAPTER}").removesuffix(".lora_E")
        ranks[module] = int(sum(bool(x) for x in mask))
    return dict(sorted(ranks.items()))


class AdaLoraCallback(TrainerCallback):
    """Drive PEFT's AdaLoRA budget from a ``Trainer`` and record the rank allocation over time.

    Args:
        model: the ``PeftModel`` being trained (AdaLoRA, adapter ``default``).
        options: the training options, to recompute the schedule from the Trainer's real step count.

    Attributes:
        calls: how many times ``update_and_allocate`` ran (one per optimizer step).
        history: one entry per budget step: ``{"step", "budget", "total_rank", "ranks": {module: rank}}``.
    """

    def __init__(self, model, options: TrainOptions):
        self.model = model
        self.options = options
        self.calls = 0
        self.history: list[dict] = []
        self._last_pattern = None

    @property
    def config(self):
        return self.model.peft_config[ADAPTER]

    def on_train_begin(self, args, state, control, **kwargs):
        """Make ``total_step`` the Trainer's real number of optimizer steps (epochs, accumulation, world size)."""
        if state.max_steps != self.config.total_step:
            schedule = adalora_schedule(self.options, state.max_steps)
            logger.warning(
                "AdaLoRA total_step %d differs from the Trainer's %d optimizer steps; using %d",
                self.config.total_step,
                state.max_steps,
                state.max_steps,
            )
            self.config.total_step = schedule.total_step
            self.config.tinit, self.config.tfinal, self.config.deltaT = (
                schedule.tinit,
                schedule.tfinal,
                schedule.delta_t,
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        """After ``optimizer.step()`` of optimizer step ``state.global_step`` (0-based), grads still present."""
        step = state.global_step
        self.model.base_model.update_and_allocate(step)
        self.calls += 1
        pattern = self.config.rank_pattern
        if pattern is not None and pattern is not self._last_pattern:
            self._last_pattern = pattern
            ranks = module_ranks(pattern)
            budget = self.model.base_model.rankallocator.budget_schedule(step)[0]
            self.history.append({"step": step, "budget": budget, "total_rank": sum(ranks.values()), "ranks": ranks})

    def history_record(self) -> dict:
        """The content of ``rank_history.json``: the schedule, then one entry per budget step."""
        c = self.config
        return {
            "method": "adalora",
            "init_r": c.init_r,
            "target_r": c.target_r,
            "total_step": c.total_step,
            "tinit": c.tinit,
            "tfinal": c.tfinal,
            "delta_t": c.deltaT,
            "update_and_allocate_calls": self.calls,
            "target_budget": c.target_r * len(self.model.base_model.rankallocator.name_set),
            "history": self.history,
        }
