"""LoRA scaling, computed in one place, with PEFT's rules.

Every reader calls these; nobody else multiplies by alpha / r.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping

# PEFT adds this to AdaLoRA's rank before dividing (``scaling / (ranknum + 1e-5)``), where ranknum is init_r.
ADALORA_EPS = 1e-5


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that matches ``module_name``, PEFT's way.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", module_name)``: the key (a regex) matches the whole name or a
    suffix of it that starts after a dot. First key wins. ``None`` when nothing matches.
    """
    for key in pattern_keys:
        if _suffix_regex(key).match(module_name) is not None:
            return key
    return None


@functools.lru_cache(maxsize=4096)
def _suffix_regex(key: str) -> re.Pattern:
    """Compiled once per key. ``re``'s own cache holds 512 patterns: a 70B model's ``rank_pattern`` has 560 keys,
    and cycling through more keys than that recompiles every key for every module."""
    return re.compile(rf"(.*\.)?({key})$")


def lora_rank_and_alpha(
    module_name: str,
    *,
    r: int,
    lora_alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> tuple[int, float]:
    """(r_m, alpha_m) of one module of a standard LoRA config, honouring the patterns."""
    rank_pattern = rank_pattern or {}
    alpha_pattern = alpha_pattern or {}
    r_key = get_pattern_key(rank_pattern, module_name)
    a_key = get_pattern_key(alpha_pattern, module_name)
    return (
        int(rank_pattern[r_key]) if r_key is not None else int(r),
        float(alpha_pattern[a_key]) if a_key is not None else float(lora_alpha),
    )


def lora_scaling(rank: int, alpha: float, *, use_rslora: bool = False) -> float:
    """Scaling of a standard LoRA module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def adalora_scaling(lora_alpha: float, init_r: int) -> float:
    """Scaling of every AdaLoRA module: lora_alpha / (init_r + 1e-5).

    With ``lora_alpha <= 0`` PEFT uses init_r in place of alpha. The kept rank and ``target_r`` never enter:
    dividing by either is the classic silent error.
    """
    alpha = lora_alpha if lora_alpha > 0 else float(init_r)
    return alpha / (init_r + ADALORA_EPS)
