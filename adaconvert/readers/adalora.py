"""Read a PEFT AdaLoRA directory: ΔW = B · diag(E) · A · lora_alpha / (init_r + 1e-5)."""

from __future__ import annotations

import torch

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.constants import RANK_HISTORY_NAME
from adaconvert.errors import AdapterShapeError, InvalidConfigError
from adaconvert.io.source import AdapterFiles, load_tensors, read_json
from adaconvert.readers._common import (
    REQUIRED,
    Field,
    ValueChecks,
    boolean,
    check_config,
    fold_scaling,
    group_by_module,
    integer,
    list_of,
    number,
    pattern,
    source_dtype,
    string,
)
from adaconvert.scaling import adalora_scaling

# Written by adaconvert.training beside the adapter: rank per module at each budget step.


# every field of adapter_config.json this reader reads, typed; JSON null reads as the default
SCHEMA = {
    "init_r": Field(integer(minimum=1), REQUIRED),
    "lora_alpha": Field(number, REQUIRED),
    "target_r": Field(integer(minimum=0)),
    "total_step": Field(integer(minimum=0)),
    # module.lora_E -> which of the init_r entries are kept; null: none recorded (every module at init_r)
    "rank_pattern": Field(pattern(list_of(boolean))),
    "fan_in_fan_out": Field(boolean, False),
    "base_model_name_or_path": Field(string),
    "task_type": Field(string),
}


def read_adalora(files: AdapterFiles) -> Adapter:
    """Normalise an AdaLoRA checkpoint into an :class:`Adapter`.

    Each module's triplet A: (r_m, in), E: (r_m, 1), B: (out, r_m) becomes LowRankDelta(A, B · diag(E) · s) with
    s = lora_alpha / (init_r + 1e-5), the scaling PEFT applies. With ``rank_pattern`` set, r_m is the number of
    kept entries (0 for a fully pruned module); with it null, r_m = init_r and pruned entries are zeros in E,
    which are dropped here (exact: they contribute nothing).

    Raises:
        InvalidConfigError, MissingTensorError, AdapterShapeError, NonFiniteError, CorruptCheckpointError.
    """
    cfg = check_config(files.config, SCHEMA, path=files.config_path)
    init_r, lora_alpha, rank_pattern = cfg["init_r"], cfg["lora_alpha"], cfg["rank_pattern"]
    scale = adalora_scaling(lora_alpha, init_r)

    tensors = load_tensors(files.weights_path)
    checks = ValueChecks(tensors, weights_path=files.weights_path, config_path=files.config_path)
    dtype = source_dtype(tensors)
    modules = group_by_module(tensors, ("lora_A", "lora_E", "lora_B"), path=files.weights_path)

    def normalise(module: str) -> LowRankDelta:
        parts = modules[module]
        A, E, B = parts["lora_A"], parts["lora_E"], parts["lora_B"]
        _check_triplet(module, A, E, B, init_r=init_r, rank_pattern=rank_pattern, files=files)
        E32 = E.float().reshape(-1)
        # masked singular values (rank_pattern null) are dropped: exact, they contribute nothing
        return fold_scaling(
            module,
            parts,
            E32 * scale,
            names=("lora_A", "lora_B"),
            keep=torch.nonzero(E32).flatten(),
            checks=checks,
            why=f"lora_E × scaling {scale:.3g}",
        )

    deltas = {module: normalise(module) for module in sorted(modules)}
    stored_ranks = {module: modules[module]["lora_A"].shape[0] for module in sorted(modules)}

    history_file = files.root / RANK_HISTORY_NAME
    provenance = {
        "source": str(files.root),
        "peft_type": "ADALORA",
        "dtype": str(dtype).removeprefix("torch."),
        "init_r": init_r,
        "target_r": cfg["target_r"],
        "lora_alpha": lora_alpha,
        "scaling": scale,
        "rank_pattern_saved": rank_pattern is not None,
        "stored_ranks": stored_ranks,
        "total_step": cfg["total_step"],
    }
    if history_file.is_file():
        provenance["rank_history"] = read_json(history_file)
    return Adapter(
        deltas=deltas,
        fan_in_fan_out=cfg["fan_in_fan_out"],
        base_model=cfg["base_model_name_or_path"],
        task_type=cfg["task_type"],
        source_kind="adalora",
        provenance=provenance,
        pending_checks=checks.wait,
    )


def _check_triplet(module, A, E, B, *, init_r, rank_pattern, files: AdapterFiles) -> None:
    """Check that A, E, B and rank_pattern agree."""
    path = files.weights_path
    if A.dim() != 2 or B.dim() != 2 or E.dim() != 2 or E.shape[1] != 1:
        raise AdapterShapeError(
            f"expected lora_A (r, in), lora_E (r, 1), lora_B (out, r); got {list(A.shape)}, {list(E.shape)}, "
            f"{list(B.shape)}",
            path=path,
            module=module,
        )
    rank = A.shape[0]
    if E.shape[0] != rank or B.shape[1] != rank:
        raise AdapterShapeError(
            f"rank mismatch: lora_A has {rank} rows, lora_E {E.shape[0]}, lora_B {B.shape[1]} columns",
            path=path,
            module=module,
            expected=rank,
            actual=(E.shape[0], B.shape[1]),
        )
    if rank_pattern is None:
        if rank != init_r:
            raise AdapterShapeError(
                f"rank_pattern is null, so every module must have init_r={init_r} entries; found {rank}",
                path=path,
                module=module,
            )
        return
    mask = rank_pattern.get(f"{module}.lora_E")
    if mask is None:
        raise InvalidConfigError(f"rank_pattern has no entry {module}.lora_E", path=files.config_path, module=module)
    if not isinstance(mask, list) or len(mask) != init_r:
        raise InvalidConfigError(
            f"rank_pattern entry must be a list of init_r={init_r} booleans", path=files.config_path, module=module
        )
    kept = sum(mask)
    if kept != rank:
        raise AdapterShapeError(
            f"rank_pattern keeps {kept} entries but the tensors have rank {rank}",
            path=path,
            module=module,
            expected=kept,
            actual=rank,
        )
