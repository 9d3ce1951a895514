"""vLLM's rules for LoRA adapters that can be checked without starting an engine (DESIGN.md §3)."""

from __future__ import annotations

from adaconvert.errors import InvalidConfigError

# The values vLLM accepts for --max-lora-rank. Kernels compute over the whole bucket, so smaller is faster.
MAX_LORA_RANK_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def smallest_bucket(rank: int) -> int | None:
    """The smallest valid ``max_lora_rank`` ≥ ``rank``; None when no bucket is large enough."""
    return next((b for b in MAX_LORA_RANK_BUCKETS if b >= rank), None)


def check_bucket(value: int) -> int:
    """``value`` if vLLM accepts it as ``max_lora_rank``, else InvalidConfigError listing the valid ones."""
    if value not in MAX_LORA_RANK_BUCKETS:
        raise InvalidConfigError(
            f"vLLM's max_lora_rank must be one of {', '.join(map(str, MAX_LORA_RANK_BUCKETS))}; got {value}"
        )
    return value
