"""Read a PEFT LoRA directory (plain, rsLoRA, rank/alpha patterns), and LoRA-Drop outputs, which are LoRA
directories with an importance file beside them."""

from __future__ import annotations

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.errors import AdapterShapeError, InvalidConfigError
from adaconvert.io.source import AdapterFiles, load_tensors, read_json
from adaconvert.readers._common import check_finite, group_by_module, require, source_dtype
from adaconvert.scaling import lora_rank_and_alpha, lora_scaling

# Written by adaconvert.training's LoRA-Drop beside the adapter: layer importance, kept/shared/dropped layers.
LORA_DROP_FILE = "lora_drop.json"

# Inits that change the base weights when PEFT loads the adapter: ΔW alone does not describe the model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (magnitude vectors)",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QALoRA",
}


def read_lora(files: AdapterFiles) -> Adapter:
    """Normalise a standard LoRA checkpoint into an :class:`Adapter`.

    Each module's A: (r_m, in), B: (out, r_m) becomes LowRankDelta(A, B · alpha_m / r_m) (alpha_m / sqrt(r_m) with
    rsLoRA), r_m and alpha_m taken from ``rank_pattern`` / ``alpha_pattern`` with PEFT's matching rule.

    Raises:
        InvalidConfigError: unsupported features (DoRA, bias, modules_to_save, base-changing inits).
        MissingTensorError, AdapterShapeError, NonFiniteError, CorruptCheckpointError.
    """
    cfg, path = files.config, files.config_path
    r = require(cfg, "r", int, path=path)
    lora_alpha = require(cfg, "lora_alpha", (int, float), path=path)
    _reject_unsupported(cfg, files)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))

    tensors = load_tensors(files.weights_path)
    dtype = source_dtype(tensors)
    hint = " (embedding LoRA, DoRA and bias terms are not supported)"
    modules = group_by_module(tensors, ("lora_A.weight", "lora_B.weight"), path=files.weights_path, hint=hint)
    deltas: dict[str, LowRankDelta] = {}
    scalings: dict[str, float] = {}
    for module in sorted(modules):
        parts = modules[module]
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        r_m, alpha_m = lora_rank_and_alpha(
            module, r=r, lora_alpha=lora_alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        )
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterShapeError(
                f"expected lora_A (r, in) and lora_B (out, r); got {list(A.shape)} and {list(B.shape)}",
                path=files.weights_path,
                module=module,
            )
        if A.shape[0] != r_m:
            raise AdapterShapeError(
                f"adapter_config.json gives rank {r_m} but lora_A has {A.shape[0]} rows",
                path=files.weights_path,
                module=module,
                expected=r_m,
                actual=A.shape[0],
            )
        check_finite(module, parts, path=files.weights_path)
        scalings[module] = lora_scaling(r_m, alpha_m, use_rslora=use_rslora)
        deltas[module] = LowRankDelta(A=A.float(), B=B.float() * scalings[module])

    provenance = {
        "source": str(files.root),
        "peft_type": "LORA",
        "dtype": str(dtype).removeprefix("torch."),
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "scalings": scalings,
        "stored_ranks": {m: d.rank for m, d in deltas.items()},
    }
    source_kind = "lora"
    if (files.root / LORA_DROP_FILE).is_file():
        source_kind = "lora-drop"
        provenance["lora_drop"] = read_json(files.root / LORA_DROP_FILE)
    return Adapter(
        deltas=deltas,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        base_model=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
        source_kind=source_kind,
        provenance=provenance,
    )


def _reject_unsupported(cfg: dict, files: AdapterFiles) -> None:
    problems = [what for flag, what in _UNSUPPORTED_FLAGS.items() if cfg.get(flag)]
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r}")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg['modules_to_save']!r} (full module copies)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} (changes the base weights; convert it with PEFT first)")
    if cfg.get("layer_replication"):
        problems.append("layer_replication")
    if problems:
        raise InvalidConfigError(f"unsupported LoRA feature(s): {'; '.join(problems)}", path=files.config_path)
