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
        if _key_matches(key, module_name):
            return key
    return None


def _key_matches(key: str, name: str) -> bool:
    """``re.match(rf"(.*\\.)?({key})$", name)``, without a regex for the usual keys (module names).

    A key of word characters, ``-`` and ``.`` has a fixed length, so it can only match the last ``len(key)``
    characters of the name, which must start the name or follow a dot; its dots match any character there.
    Other keys (real regexes) go through ``re``. Compiling a regex per key cost more than the rest of a
    conversion for a 224-module adapter.
    """
    if not _is_plain(key):
        return _suffix_regex(key).match(name) is not None
    start = len(name) - len(key)
    if start < 0 or (start > 0 and name[start - 1] != "."):
        return False
    tail = name[start:]
    return tail == key or all(k == "." or k == c for k, c in zip(key, tail, strict=True))


@functools.lru_cache(maxsize=4096)
def _is_plain(key: str) -> bool:
    return re.fullmatch(r"[\w.-]*", key, flags=re.ASCII) is not None


@functools.lru_cache(maxsize=4096)
def _suffix_regex(key: str) -> re.Pattern:
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
