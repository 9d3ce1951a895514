"""AdaLoRA with the HF ``Trainer``, done right (docs/design.md §2).

``Trainer`` never calls ``update_and_allocate``, so without help PEFT's AdaLoRA never prunes: the ranks stay at
``init_r`` and ``rank_pattern`` stays null. :class:`AdaLoraCallback` calls it once per optimizer step, in
``on_optimizer_step`` (after ``optimizer.step()``, before the gradients are cleared: the importance scores need
them), with the index of that step; under DDP every process sees the same all-reduced gradients and so computes
the same mask. It also records the rank of every module at each budget step (``rank_history.json``).

- Under FSDP each process holds a shard of every ``lora_A/E/B`` and of its gradient, while PEFT's allocator
  scores whole rows and columns and takes one threshold over all modules. The allocator is given the whole
  tensors instead (:class:`_WholeAdapter`, gathered on every process), so every process computes the budget of a
  single process and applies the same masks to its shards.
- A step that the fp16 loss scaler skipped (inf/NaN gradients) is not an optimizer step: the schedule counts real
  steps only, the importance scores never read those gradients, and the budgeting phase is shortened by each
  skipped step, so that the final ranks (the target budget) are still fixed ``tfinal`` steps before the end.
- PEFT's dtype casts re-create ``ranknum`` (each module's rank divisor) as a trainable parameter when the base is
  bf16 / fp16: :func:`freeze_ranknum` freezes it, or AdamW would train a divisor the saved adapter does not keep.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from adaconvert.training.config import AdaLoraSchedule, TrainOptions, adalora_schedule
from adaconvert.training.sharding import full_tensors, is_sharded, shard_like

logger = logging.getLogger(__name__)

ADAPTER = "default"
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's RankAllocator: scores and their EMAs, per tensor


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


def adalora_peft_config(model):
    """The AdaLoRA config of adapter ``default`` of the ``PeftModel`` ``model``, or ``None`` for other models."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    return config if config is not None and config.peft_type == "ADALORA" else None


def freeze_ranknum(model) -> int:
    """Make every ``ranknum`` of ``model`` a constant again; returns how many were trainable."""
    thawed = [p for name, p in model.named_parameters() if ".ranknum." in name and p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    return len(thawed)


def orthogonality_penalty(model) -> torch.Tensor:
    """PEFT's orthogonality regulariser R = mean over every ``lora_A`` / ``lora_B`` P of ‖P Pᵀ − I‖_F (A: r × in,
    PPᵀ; B: out × r, PᵀP), on whole tensors: under FSDP all the shards are gathered in one collective
    (differentiably), not one per tensor, since this runs on every micro-batch."""
    names, params = [], []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            names.append(name)
            params.append(p)
    terms = []
    for name, whole in zip(names, full_tensors(params), strict=True):
        cov = whole @ whole.T if "lora_A" in name else whole.T @ whole
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean()


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
        calls: how many times ``update_and_allocate`` ran (one per optimizer step the loss scaler did not skip).
        skipped: optimizer steps the loss scaler skipped.
        history: one entry per budget step: ``{"step", "budget", "total_rank", "ranks": {module: rank}}``.
    """

    def __init__(self, model, options: TrainOptions):
        self.model = model
        self.options = options
        self.calls = 0
        self.skipped = 0
        self.history: list[dict] = []
        self._last_pattern = None

    @property
    def config(self):
        return self.model.peft_config[ADAPTER]

    def on_train_begin(self, args, state, control, **kwargs):
        """Make ``total_step`` the Trainer's real number of optimizer steps (epochs, accumulation, world size)."""
        if self.calls == self.skipped == 0 and state.max_steps != self.config.total_step:  # not on a resume
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

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """After ``optimizer.step()``, grads still present: the budget step of the real optimizer steps taken so far
        (0-based), unless the loss scaler skipped this one."""
        if getattr(optimizer, "step_was_skipped", False):
            self.skipped += 1
            self._shorten_schedule()
            logger.info("AdaLoRA: the loss scaler skipped optimizer step %d; the budget waits", state.global_step)
            return
        step = self.calls
        if any(is_sharded(p) for p in self.model.parameters()):
            _update_and_allocate_whole(self.model.base_model, step)
        else:
            self.model.base_model.update_and_allocate(step)
        self.calls += 1
        pattern = self.config.rank_pattern
        if pattern is not None and pattern is not self._last_pattern:
            self._last_pattern = pattern
            ranks = module_ranks(pattern)
            budget = self.model.base_model.rankallocator.budget_schedule(step)[0]
            self.history.append({"step": step, "budget": budget, "total_rank": sum(ranks.values()), "ranks": ranks})

    def _shorten_schedule(self) -> None:
        """One real optimizer step fewer than the Trainer counts: the schedule (in real steps) loses one step from
        its budgeting phase, so that the final allocation still comes ``tfinal`` Trainer steps before the end. It
        never moves before the next real step, which therefore still makes the final allocation (the budget is
        reached however many steps were skipped); once the ranks are final, nothing moves."""
        c = self.config
        if self.calls <= c.total_step - c.tfinal:
            c.total_step = max(c.total_step - 1, self.calls + c.tfinal)

    def checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a resumed run needs to continue the budget exactly: the counters and history, the schedule (as
        skipped steps shortened it) and rank pattern (JSON), and the allocator's importance scores and EMAs."""
        c, allocator = self.config, self.model.base_model.rankallocator
        state = {
            "calls": self.calls,
            "skipped": self.skipped,
            "history": self.history,
            "rank_pattern": c.rank_pattern,
            "schedule": [c.total_step, c.tinit, c.tfinal, c.deltaT],
        }
        tensors = {f"{kind}/{name}": t for kind in _ALLOCATOR_STATE for name, t in getattr(allocator, kind).items()}
        return state, tensors

    def load_checkpoint_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        c, allocator = self.config, self.model.base_model.rankallocator
        self.calls, self.skipped, self.history = state["calls"], state["skipped"], state["history"]
        c.total_step, c.tinit, c.tfinal, c.deltaT = state["schedule"]
        c.rank_pattern = state["rank_pattern"]
        self._last_pattern = c.rank_pattern  # already in the history
        device = next(p.device for p in self.model.parameters())
        for kind in _ALLOCATOR_STATE:
            prefix = f"{kind}/"
            setattr(
                allocator,
                kind,
                {k.removeprefix(prefix): t.to(device) for k, t in tensors.items() if k.startswith(prefix)},
            )

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
            "skipped_steps": self.skipped,
            "target_budget": c.target_r * len(self.model.base_model.rankallocator.name_set),
            "history": self.history,
        }


class _WholeAdapter:
    """The AdaLoRA tensors of a sharded model, whole, as PEFT's ``RankAllocator`` reads them: ``named_parameters()``
    yields a gathered copy of every ``lora_A/E/B`` with its gathered gradient, under the model's own names.
    :meth:`write_back` gives each process its shard of the masked ``lora_E``."""

    def __init__(self, model, adapter: str, *, gradients: bool):
        self.shards = {n: p for n, p in model.named_parameters() if "lora_" in n and adapter in n}
        with_grad = [n for n, p in self.shards.items() if gradients and p.grad is not None]
        # one collective for all the tensors and gradients (per dtype), not one each
        gathered = full_tensors([p.detach() for p in self.shards.values()] + [self.shards[n].grad for n in with_grad])
        self.whole = {
            name: torch.nn.Parameter(tensor.clone(), requires_grad=False)
            for name, tensor in zip(self.shards, gathered, strict=False)
        }
        for name, grad in zip(with_grad, gathered[len(self.shards) :], strict=True):
            self.whole[name].grad = grad

    def named_parameters(self):
        return iter(self.whole.items())

    @torch.no_grad()
    def write_back(self) -> None:
        for name, shard in self.shards.items():
            if ".lora_E." in name:
                shard.to_local().copy_(shard_like(self.whole[name], shard))


def _update_and_allocate_whole(adalora_model, step: int) -> None:
    """PEFT's ``AdaLoraModel.update_and_allocate(step)``, with the allocator reading whole tensors (the same on
    every process) and the masks written back to the shards."""
    config = adalora_model.peft_config[adalora_model.trainable_adapter_name]
    allocator = adalora_model.rankallocator
    final = config.total_step - config.tfinal
    whole = _WholeAdapter(adalora_model.model, adalora_model.trainable_adapter_name, gradients=step <= final)
    if step < final:
        _, pattern = allocator.update_and_allocate(whole, step)
        if pattern:
            config.rank_pattern = pattern
    elif step == final:
        _, pattern = allocator.update_and_allocate(whole, step, force_mask=True)
        config.rank_pattern = pattern
        allocator.reset_ipt()
    else:
        allocator.mask_using_rank_pattern(whole, config.rank_pattern)
    whole.write_back()
