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
    static vLLM check, every runtime's rule)."""
    if "\n" in module_name:  # re's "$" may match before a final newline: every key is tried, through re
        return next((key for key in keys if _matcher(key)(module_name)), None)
    exact, by_length, others = _index(keys)
    found, sure = set(others), set()
    for size in _suffix_sizes(module_name):
        suffix = module_name[-size:]
        if suffix in exact:
            sure.add(exact[suffix])  # the key is this suffix, character for character: it matches
        dots = suffix.count(".")
        found.update(i for more, group in by_length.get(size, {}).items() if more > dots for i in group)
    return next((keys[i] for i in sorted(found | sure) if i in sure or _matcher(keys[i])(module_name)), None)


def _suffix_sizes(name: str) -> list[int]:
    """The lengths of the suffixes a key can match: the whole name, and every part after one of its dots."""
    return [len(name)] + [len(name) - i - 1 for i, c in enumerate(name) if c == "." and i + 1 < len(name)]


@functools.lru_cache(maxsize=64)
def _index(keys: tuple[str, ...]) -> tuple[dict[str, int], dict[int, dict[int, list[int]]], list[int]]:
    """Where to look for the keys that can match a name: ``(exact, by_length, others)``.

    A plain key (literal characters and dots, each dot matching any character) matches a suffix of the same length
    whose dots are all at dots of the key. With as many dots, the key *is* the suffix: ``exact`` (key → its first
    position). With more, some of its dots match other characters: ``by_length`` (length → dot count → positions),
    tried through the matcher. ``others``: the positions of the regular expressions, which any name may match.
    A 70B pattern has 560 keys; a name meets one or two of them here, not the 80 that share its last part.
    """
    exact: dict[str, int] = {}
    by_length: dict[int, dict[int, list[int]]] = {}
    others = []
    for i, key in enumerate(keys):
        if not _is_plain(key):
            others.append(i)
            continue
        exact.setdefault(key, i)
        by_length.setdefault(len(key), {}).setdefault(key.count("."), []).append(i)
    return exact, by_length, others


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


class _Keys(tuple):
    """A tuple of pattern keys whose hash is computed once: ``_pattern_key``'s cache hashes its arguments on every
    call, and a tuple's hash is not kept (every key's hash combined again: 3 µs for 224 keys)."""

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            self._hash = tuple.__hash__(self)
            return self._hash


@functools.lru_cache(maxsize=64)
def _keys(keys: tuple[str, ...]) -> _Keys:
    """One :class:`_Keys` for equal tuples of keys: ``_pattern_key``'s cache then finds an entry made for another
    config with the same patterns (the static vLLM check's, the runtime rules') by identity, instead of comparing
    every key again (8 µs for 224 keys)."""
    return _Keys(keys)


class LoraPatterns:
    """A LoRA config's ``r`` and ``lora_alpha`` with its ``rank_pattern`` and ``alpha_pattern``, looked up per module
    the way PEFT does.

    Build one per config and ask it for every module: the pattern keys are gathered, and hashed, once (gathering
    224 keys on each lookup cost 7 µs, 10 ms over the lookups of one 8B conversion's checks; hashing them for the
    lookup's cache, 3 µs).
    """

    def __init__(
        self,
        *,
        r: int,
        lora_alpha: float,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
    ):
        self.r, self.lora_alpha = r, lora_alpha
        self.rank_pattern, self.alpha_pattern = rank_pattern or {}, alpha_pattern or {}
        self._rank_keys, self._alpha_keys = _keys(tuple(self.rank_pattern)), _keys(tuple(self.alpha_pattern))

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r_m, alpha_m) of one module."""
        r_key = _pattern_key(self._rank_keys, module_name)
        a_key = _pattern_key(self._alpha_keys, module_name)
        return (
            int(self.rank_pattern[r_key]) if r_key is not None else int(self.r),
            float(self.alpha_pattern[a_key]) if a_key is not None else float(self.lora_alpha),
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
