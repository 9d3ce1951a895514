"""LoRA scaling, computed in one place, with PEFT's rules.

Every reader calls these; nobody else multiplies by alpha / r.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping

# PEFT adds this to AdaLoRA's rank before dividing (``scaling / (ranknum + 1e-5)``), where ranknum is init_r.
ADALORA_EPS = 1e-5


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that matches ``module_name``, PEFT's way.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", module_name)``: the key (a regex) matches the whole name or a
    suffix of it that starts after a dot. First key wins. ``None`` when nothing matches.
    """
    return _pattern_key(tuple(pattern_keys), module_name)


@functools.lru_cache(maxsize=8192)
def _pattern_key(keys: tuple[str, ...], module_name: str) -> str | None:
    """:func:`get_pattern_key`, remembered: a conversion asks for each module's key several times (the reader, the
    static vLLM check, every runtime's rule), each time scanning a few dozen candidate keys."""
    if "\n" in module_name:  # re's "$" may match before a final newline: every key is tried, through re
        candidates = keys
    else:  # only keys whose literal tail ends the name can match: a 70B pattern has 560 keys, 80 per tail
        by_tail, others = _by_tail(keys)
        found = [group for tail, group in by_tail.items() if module_name.endswith(tail)]
        candidates = [keys[i] for i in sorted(others.union(*found))]
    return next((key for key in candidates if _matcher(key)(module_name)), None)


@functools.lru_cache(maxsize=64)
def _by_tail(keys: tuple[str, ...]) -> tuple[dict[str, frozenset[int]], frozenset[int]]:
    """The positions of the plain keys by their literal tail (the text after their last dot), and those of the
    other keys (regular expressions: any name may match them)."""
    by_tail: dict[str, set[int]] = {}
    for i, key in enumerate(keys):
        if _is_plain(key):
            by_tail.setdefault(key.rsplit(".", 1)[-1], set()).add(i)
    plain = set().union(*by_tail.values())
    return {t: frozenset(g) for t, g in by_tail.items()}, frozenset(set(range(len(keys))) - plain)


def pattern_error(key: str) -> str | None:
    """Why ``key`` is not a valid regular expression (None when it is; a plain module name always is)."""
    if _is_plain(key):
        return None
    try:
        re.compile(key)
    except re.error as exc:
        return str(exc)
    return None


# every character that is not literal in a regex, but ``.`` (any character): keys without them are module names
_REGEX_SYNTAX = frozenset("^$*+?{}[]\\|()")


def _is_plain(key: str) -> bool:
    return bool(key) and _REGEX_SYNTAX.isdisjoint(key)


@functools.lru_cache(maxsize=4096)
def _matcher(key: str) -> Callable[[str], bool]:
    """``name -> bool``, PEFT's match of ``key``, compiled once per key.

    A plain key (a module name: literal characters and dots) is matched without a regex, exactly as the regex would:
    its dots match any character but a newline, so the name's last ``len(key)`` characters must equal the key's
    literal runs at their offsets, and what precedes them must be empty or end with a dot. A 70B model's
    ``rank_pattern`` has 560 such keys; compiling them costs more than converting the adapter. Other keys, and
    names holding a newline (where ``$`` may match before it), go through ``re``.
    """
    regex = functools.cache(lambda: re.compile(rf"(.*\.)?({key})$"))
    if not _is_plain(key):
        return lambda name: regex().match(name) is not None
    runs, offset = [], 0
    for run in key.split("."):
        if run:
            runs.append((offset, run))
        offset += len(run) + 1
    last = key.rsplit(".", 1)[-1]  # a literal suffix every match ends with
    runs = runs[-2::-1] if last else runs[::-1]  # from the end, ``last`` left out: the layer number comes soon
    size = len(key)

    def match(name: str) -> bool:
        if "\n" in name:
            return regex().match(name) is not None
        if not name.endswith(last) or len(name) < size:
            return False
        start = len(name) - size
        if start and name[start - 1] != ".":
            return False
        return all(name.startswith(run, start + at) for at, run in runs)

    return match


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
