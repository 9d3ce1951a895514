"""File names, in one place: each name means one file everywhere (the PEFT, transformers and safetensors ones are
theirs; the report and summary files are ours)."""

from __future__ import annotations

# dtypes an output can be written in (--dtype); the math is float32 whatever the output
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")

# a PEFT adapter directory; every tensor key of a PEFT adapter starts with PEFT_PREFIX, then the module name
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAMES = (ADAPTER_WEIGHTS_NAME, "adapter_model.bin", "adapter_model.pt")  # the order PEFT tries

# an mlx-lm adapter directory (its config is ADAPTER_CONFIG_NAME too)
MLX_ADAPTER_WEIGHTS_NAME = "adapters.safetensors"

# a transformers model directory
MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
MODEL_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# the model card (Hub and local)
CARD_NAME = "README.md"

# what adaconvert writes beside its outputs
CONVERSION_REPORT_NAME = "conversion_report.json"
MERGE_REPORT_NAME = "merge_report.json"
VALIDATION_REPORT_NAME = "validation_report.json"
TRAINING_SUMMARY_NAME = "training_summary.json"
DEMO_SUMMARY_NAME = "demo_summary.json"
RANK_HISTORY_NAME = "rank_history.json"
LORA_DROP_NAME = "lora_drop.json"
# size and sha256 of every file of a conversion cached for serving (adaconvert/serving/store.py)
SERVE_MANIFEST_NAME = "adaconvert_manifest.json"
# a run's checkpoints (--save-steps, --resume): OUTPUT + CHECKPOINTS_SUFFIX holds the run's options, one folder of
# HF Trainer checkpoints per phase and LoRA-Drop's selection; each checkpoint gets our state beside the Trainer's
CHECKPOINTS_SUFFIX = ".checkpoints"
CHECKPOINT_RUN_NAME = "run.json"
CHECKPOINT_SELECTION_NAME = "lora_drop_selection.json"
CHECKPOINT_STATE_NAME = "adaconvert_state.json"  # written last: a checkpoint without it is incomplete
CHECKPOINT_TENSORS_NAME = "adaconvert_state.safetensors"
RANK_HEATMAP_NAME = "rank_heatmap.png"
THIRD_PARTY_LOG_NAME = "third_party.log"
