"""LoRA-Drop (docs/design.md §5): score each layer's LoRA after a pilot run, keep the important layers, share one LoRA
across the rest (the paper) or drop them (the blog version).

Importance of a module, on the pilot sample:

- ``output`` (paper, default): g = Σ_tokens ‖ΔW x‖², measured by forward hooks on real forward passes
  (ΔW x = lora_B(lora_A(x)) · scaling, padding tokens excluded);
- ``weight-l1``: ‖A‖₁ + ‖B‖₁ of the trained factors.

A unit (a transformer block, or a single module with ``granularity="module"``) scores the sum over its modules,
normalised to I_u = g_u / Σ g. Selection keeps the top units until Σ I reaches the threshold (default 0.9), or a
fixed fraction of them. Modules outside the numbered blocks (an adapted ``lm_head``) are units of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adaconvert.adapter import split_module_name
from adaconvert.constants import PEFT_PREFIX
from adaconvert.errors import InvalidConfigError
from adaconvert.training.adalora import ADAPTER
from adaconvert.training.sharding import full_tensors


def lora_modules(model) -> dict:
    """{module name inside the base model: PEFT LoRA layer} for every module that carries adapter ``default``."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            found[name.removeprefix(PEFT_PREFIX)] = module
    return found


@torch.no_grad()
def output_importance(model, batches) -> dict[str, float]:
    """g_m = Σ over the tokens of ``batches`` of ‖ΔW_m x‖² for every LoRA module m (the paper's score).

    Forward hooks on each module's ``lora_B`` see lora_B(lora_A(dropout(x))) of the real forward pass; the model
    runs in eval mode (no dropout) and padding positions (``attention_mask == 0``) are left out.

    Args:
        model: a PEFT LoRA model (``PeftModel`` or ``LoraModel``) called as ``model(input_ids=, attention_mask=)``.
        batches: iterable of dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T).

    Returns:
        {module name: g_m}, float64 sums as Python floats.
    """
    modules = lora_modules(model)
    totals = dict.fromkeys(modules, 0.0)
    state: dict = {"mask": None}
    handles = []

    def make_hook(name, layer):
        def hook(_module, _inputs, output):
            y = output.float() * layer.scaling[ADAPTER]
            per_token = y.pow(2).sum(-1)
            mask = state["mask"]
            if mask is not None and mask.shape == per_token.shape:
                per_token = per_token * mask
            # kept on the device: a float() here would wait for the GPU in every module of every batch
            totals[name] = totals[name] + per_token.double().sum()

        return hook

    for name, layer in modules.items():
        handles.append(layer.lora_B[ADAPTER].register_forward_hook(make_hook(name, layer)))
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            state["mask"] = mask.to(torch.float32) if mask is not None else None
            # the hooks need the layers' outputs only: the head computes the last position's logits, not the
            # full-vocabulary logits of every position (4 × 1024 × 152k in bf16 is 1.25 GB per batch)
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: float(total) for name, total in totals.items()}


@torch.no_grad()
def weight_l1_importance(model) -> dict[str, float]:
    """‖A_m‖₁ + ‖B_m‖₁ (sum of absolute entries of both factors) for every LoRA module m (FSDP shards gathered, all
    in one collective: every process must call this)."""
    layers = lora_modules(model)
    weights = full_tensors(
        [w for layer in layers.values() for w in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
    )
    return {
        name: float(a.abs().double().sum() + b.abs().double().sum())
        for name, a, b in zip(layers, weights[0::2], weights[1::2], strict=True)
    }


def unit_of(module: str, granularity: str) -> str:
    """The selection unit of ``module``: its block index (``"3"``) for ``layer``, or the module name itself."""
    layer, _ = split_module_name(module)
    return module if granularity == "module" or layer is None else str(layer)


def unit_scores(module_scores: dict[str, float], granularity: str) -> dict[str, float]:
    """Σ of module scores per unit, units in model order (blocks by index)."""
    scores: dict[str, float] = {}
    for module, score in module_scores.items():
        unit = unit_of(module, granularity)
        scores[unit] = scores.get(unit, 0.0) + score
    return dict(sorted(scores.items(), key=lambda kv: _unit_order(kv[0])))


def _unit_order(unit: str):
    return (0, int(unit), "") if unit.isdigit() else (1, 0, unit)


def normalise(scores: dict[str, float]) -> dict[str, float]:
    """I_u = g_u / Σ g.

    Raises:
        InvalidConfigError: every score is zero (the pilot did not move the adapters: train it longer).
    """
    total = sum(scores.values())
    if not total > 0 or not math.isfinite(total):
        raise InvalidConfigError(
            f"LoRA-Drop importance sums to {total}: the pilot run left every LoRA at zero or non-finite; "
            "raise --pilot-fraction, --steps or --lr"
        )
    return {u: s / total for u, s in scores.items()}


def select_units(
    importance: dict[str, float], *, threshold: float | None = None, keep_fraction: float | None = None
) -> tuple[list[str], list[str]]:
    """(kept units, other units), both in model order.

    With ``threshold`` T: the fewest most-important units whose normalised importance sums to at least T (the
    unit that crosses T is kept). With ``keep_fraction`` p: the ceil(p · n) most important units (at least one).
    Ties keep the earlier unit.

    Args:
        importance: normalised importance per unit (sums to 1).
    """
    if (threshold is None) == (keep_fraction is None):
        raise ValueError("give exactly one of threshold and keep_fraction")
    ranked = sorted(importance, key=lambda u: -importance[u])  # stable: ties keep model order
    if keep_fraction is not None:
        count = max(1, math.ceil(keep_fraction * len(ranked) - 1e-9))
    else:
        cumulative, count = 0.0, 0
        for unit in ranked:
            count += 1
            cumulative += importance[unit]
            if cumulative >= threshold - 1e-12:
                break
    kept = set(ranked[:count])
    order = list(importance)
    return [u for u in order if u in kept], [u for u in order if u not in kept]


@dataclass
class DropPlan:
    """What the main run trains: kept modules with their own LoRA, shared groups tied to one LoRA per module kind
    (policy ``share``), dropped modules with none (policy ``drop``)."""

    kept_modules: list[str]
    shared_groups: dict[str, list[str]] = field(default_factory=dict)
    dropped_modules: list[str] = field(default_factory=list)

    @property
    def target_modules(self) -> list[str]:
        return self.kept_modules + [m for group in self.shared_groups.values() for m in group]


def plan(modules: list[str], kept_units: list[str], *, policy: str, granularity: str) -> DropPlan:
    """Split ``modules`` by the kept units; the rest are shared per module kind (``share``) or dropped."""
    keep = set(kept_units)
    kept = [m for m in modules if unit_of(m, granularity) in keep]
    rest = [m for m in modules if unit_of(m, granularity) not in keep]
    if policy == "drop":
        return DropPlan(kept_modules=kept, dropped_modules=rest)
    groups: dict[str, list[str]] = {}
    for module in rest:
        groups.setdefault(split_module_name(module)[1], []).append(module)
    return DropPlan(kept_modules=kept, shared_groups=groups)


def tie_shared(model, groups: dict[str, list[str]]) -> None:
    """Make every module of each group use the first one's ``lora_A`` / ``lora_B`` (the same ``nn.Linear``
    objects, so the same parameters, trained once with the summed gradient). A state dict still lists one copy
    per module, which is what a LoRA checkpoint needs: PEFT writes each layer its own copy of the shared LoRA.
    Under FSDP the tied modules stay out of every shard unit (see :mod:`adaconvert.training.phase`).

    Raises:
        InvalidConfigError: modules of one kind have different shapes (cannot share one LoRA).
    """
    layers = lora_modules(model)
    for kind, names in groups.items():
        first = layers[names[0]]
        for name in names[1:]:
            layer = layers[name]
            shapes = (first.lora_A[ADAPTER].weight.shape, first.lora_B[ADAPTER].weight.shape)
            if (layer.lora_A[ADAPTER].weight.shape, layer.lora_B[ADAPTER].weight.shape) != shapes:
                raise InvalidConfigError(f"cannot share one LoRA across {kind} modules of different shapes")
            layer.lora_A[ADAPTER] = first.lora_A[ADAPTER]
            layer.lora_B[ADAPTER] = first.lora_B[ADAPTER]
