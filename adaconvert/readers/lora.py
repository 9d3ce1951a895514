"""Read a PEFT LoRA directory (plain, rsLoRA, rank/alpha patterns), and LoRA-Drop outputs, which are LoRA
directories with an importance file beside them."""

from __future__ import annotations

from adaconvert.adapter import Adapter, LowRankDelta
from adaconvert.constants import LORA_DROP_NAME
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
    one_of,
    pattern,
    source_dtype,
    string,
    strings,
)
from adaconvert.scaling import LoraPatterns, lora_scaling

# Written by adaconvert.training's LoRA-Drop beside the adapter: layer importance, kept/shared/dropped layers.

# Inits that change the base weights when PEFT loads the adapter: ΔW alone does not describe the model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# every field of adapter_config.json this reader reads, typed; JSON null reads as the default
SCHEMA = {
    "r": Field(integer(minimum=1), REQUIRED),
    "lora_alpha": Field(number, REQUIRED),
    "rank_pattern": Field(pattern(integer(minimum=1)), {}),
    "alpha_pattern": Field(pattern(number), {}),
    "use_rslora": Field(boolean, False),
    "fan_in_fan_out": Field(boolean, False),
    "base_model_name_or_path": Field(string),
    "task_type": Field(string),
    "use_dora": Field(boolean, False),
    "lora_bias": Field(boolean, False),
    "use_qalora": Field(boolean, False),
    "bias": Field(string, "none"),
    "modules_to_save": Field(strings),
    "init_lora_weights": Field(one_of(boolean, string), True),
    "layer_replication": Field(list_of(list_of(integer(minimum=0)))),
}
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
    cfg = check_config(files.config, SCHEMA, path=files.config_path)
    r, lora_alpha, use_rslora = cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]
    _reject_unsupported(cfg, files)
    rank_pattern, alpha_pattern = cfg["rank_pattern"], cfg["alpha_pattern"]

    loaded = load_tensors(files.weights_path)
    # all of the file, in one reduction (a bound for the tensors kept)
    checks = ValueChecks(loaded, weights_path=files.weights_path, config_path=files.config_path)
    tensors = _without_saved_embedding_layers(loaded)
    dtype = source_dtype(tensors)
    hint = " (embedding LoRA, DoRA and bias terms are not supported)"
    modules = group_by_module(tensors, ("lora_A.weight", "lora_B.weight"), path=files.weights_path, hint=hint)

    patterns = LoraPatterns(r=r, lora_alpha=lora_alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def normalise(module: str) -> tuple[LowRankDelta, float]:
        parts = modules[module]
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        r_m, alpha_m = patterns.rank_and_alpha(module)
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
        scaling = lora_scaling(r_m, alpha_m, use_rslora=use_rslora)
        delta = fold_scaling(
            module,
            parts,
            scaling,
            names=("lora_A.weight", "lora_B.weight"),
            checks=checks,
            why=f"scaling {scaling:.3g}",
        )
        return delta, scaling

    normalised = {module: normalise(module) for module in sorted(modules)}
    deltas = {module: delta for module, (delta, _) in normalised.items()}
    scalings = {module: scaling for module, (_, scaling) in normalised.items()}

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
    if (files.root / LORA_DROP_NAME).is_file():
        source_kind = "lora-drop"
        provenance["lora_drop"] = read_json(files.root / LORA_DROP_NAME)
    return Adapter(
        deltas=deltas,
        fan_in_fan_out=cfg["fan_in_fan_out"],
        base_model=cfg["base_model_name_or_path"],
        task_type=cfg["task_type"],
        source_kind=source_kind,
        provenance=provenance,
        pending_checks=checks.wait,
    )


# PEFT's save_embedding_layers: when embed_tokens or lm_head is a LoRA target, PEFT also saves that layer's frozen base
# matrix as ``<module>.base_layer.weight`` (peft/utils/save_and_load.py, get_peft_model_state_dict; the names are its
# EMBEDDING_LAYER_NAMES). It is the base's own weight (a tied head's is the embedding matrix), not part of the update.
_SAVED_EMBEDDING_LAYERS = ("embed_tokens", "lm_head")


def _without_saved_embedding_layers(tensors: dict) -> dict:
    """``tensors`` less the base-layer copies PEFT saves beside a LoRA on an embedding or output head."""
    drop = {
        key
        for key in tensors
        if key.endswith(".base_layer.weight")
        and key.removesuffix(".base_layer.weight").rsplit(".", 1)[-1] in _SAVED_EMBEDDING_LAYERS
        and key.replace(".base_layer.weight", ".lora_A.weight") in tensors
    }
    return {k: v for k, v in tensors.items() if k not in drop}


def _reject_unsupported(cfg: dict, files: AdapterFiles) -> None:
    problems = [what for flag, what in _UNSUPPORTED_FLAGS.items() if cfg[flag]]
    if cfg["bias"] != "none":
        problems.append(f"bias={cfg['bias']!r}")
    if cfg["modules_to_save"]:
        problems.append(f"modules_to_save={cfg['modules_to_save']!r} (full module copies)")
    init = cfg["init_lora_weights"]
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} (changes the base weights; convert it with PEFT first)")
    if cfg["layer_replication"]:
        problems.append("layer_replication")
    if problems:
        raise InvalidConfigError(f"unsupported LoRA feature(s): {'; '.join(problems)}", path=files.config_path)
